// Light or dark: the system's choice unless the user picked one (kept in localStorage). A classic
// script in the page's head, so the theme is set before the first paint.
"use strict";

(() => {
  const THEME_KEY = "petals-chat-theme";
  const apply = (theme) => {
    if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
    else delete document.documentElement.dataset.theme;
  };
  apply(localStorage.getItem(THEME_KEY));
  document.addEventListener("DOMContentLoaded", () => {
    const picker = document.getElementById("theme");
    picker.value = document.documentElement.dataset.theme || "system";
    picker.addEventListener("change", () => {
      localStorage.setItem(THEME_KEY, picker.value);
      apply(picker.value);
    });
  });
})();
