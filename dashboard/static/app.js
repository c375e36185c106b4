// plunkd dashboard: small enhancements over pages that work without JavaScript.
// Times are rendered in UTC on the server; here they are shown in the browser's time zone.
// Copy buttons copy their data-copy value. Nothing here is needed for a form to work.
(function () {
  "use strict";
  var format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit"
  });

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      if (el.dataset.local) { return; }
      var moment = new Date(el.getAttribute("datetime"));
      if (!isNaN(moment.getTime())) {
        el.title = el.textContent;
        el.textContent = format.format(moment);
        el.dataset.local = "1";
      }
    });
  }

  function onCopy(event) {
    var button = event.target.closest("button[data-copy]");
    if (!button) { return; }
    var value = button.getAttribute("data-copy");
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(value).then(done, function () { select(button); });
    } else {
      select(button);
    }
  }

  function select(button) {
    var code = button.parentElement.querySelector("code");
    if (!code) { return; }
    var range = document.createRange();
    range.selectNodeContents(code);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try { document.execCommand("copy"); button.textContent = "Copied"; } catch (e) { /* selected: copy by hand */ }
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    document.addEventListener("click", onCopy);
    document.body.addEventListener("htmx:afterSwap", function (event) { localTimes(event.target); });
  });
}());
