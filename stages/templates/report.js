// The latents table: click a header to sort; the search box and the filters hide rows.
(function () {
  var table = document.getElementById('latents');
  if (!table) return;
  var heads = table.tHead.rows[0].cells;
  var body = table.tBodies[0];
  function value(row, col) { return row.cells[col].getAttribute('data-v'); }
  function sortBy(col) {
    var th = heads[col];
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    var numeric = th.getAttribute('data-type') === 'num';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, col), y = value(b, col);
      if (x === '' || y === '') { if (x === y) return 0; return x === '' ? 1 : -1; }  // missing last
      var d = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      if (!asc) d = -d;
      return d || Number(value(a, 0)) - Number(value(b, 0));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute('aria-sort');
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
  }
  for (var i = 0; i < heads.length; i++) {
    (function (col) { heads[col].addEventListener('click', function () { sortBy(col); }); })(i);
  }

  var search = document.getElementById('search');
  var showDead = document.getElementById('show-dead');
  var coveredOnly = document.getElementById('covered-only');  // absent without ground truth
  var topClass = document.getElementById('top-class');
  var count = document.getElementById('n-visible');
  // every word must be a latent id, or part of the row's class name or attribute values
  function matches(row, words) {
    var id = row.getAttribute('data-latent');
    var names = row.getAttribute('data-names').toLowerCase();
    return words.every(function (w) { return w === id || names.indexOf(w) >= 0; });
  }
  function apply() {
    var words = search.value.toLowerCase().split(/\s+/).filter(function (w) { return w !== ''; });
    var n = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var show = (showDead.checked || row.getAttribute('data-dead') !== '1') &&
        (!coveredOnly || !coveredOnly.checked || row.getAttribute('data-covered') === '1') &&
        (topClass.value === '' || row.getAttribute('data-class') === topClass.value) &&
        matches(row, words);
      row.hidden = !show;
      if (show) n++;
    });
    count.textContent = n;
  }
  [search, showDead, coveredOnly, topClass].forEach(function (control) {
    if (!control) return;
    control.addEventListener('input', apply);
    control.addEventListener('change', apply);
  });
  apply();  // a reload keeps the controls' state
})();
