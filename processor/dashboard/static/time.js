// Shows every <time datetime="…"> in the viewer's own time zone (the page renders UTC; hover for it).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const long = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  const short = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  for (const el of document.querySelectorAll("time[datetime]")) {
    const when = new Date(el.getAttribute("datetime"));
    if (Number.isNaN(when.getTime())) continue;
    el.title = el.textContent;
    el.textContent = (el.classList.contains("short") ? short : long).format(when);
  }
});
