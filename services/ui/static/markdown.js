// An answer rendered as GitHub-flavoured Markdown, safe whatever the model wrote: raw HTML in the
// Markdown is shown as text, the HTML marked makes is sanitised by DOMPurify to a short list of
// tags and attributes (no script, image, style or form; links only to http(s) and mailto, opened
// in a new tab without referrer), and code blocks are highlighted by highlight.js (its output
// sanitised again) with a copy button.
import { Marked } from "./marked.js";
import DOMPurify from "./purify.js";
import hljs from "./highlight.js";

const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const markdown = new Marked({ gfm: true, breaks: true, async: false });
markdown.use({ renderer: { html: (token) => escapeHtml(token.text) } });

const PURIFY = {
  ALLOWED_TAGS: ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "code", "pre",
    "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "a", "span"],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  RETURN_DOM_FRAGMENT: true,
};
const LANGUAGE_CLASS = /^language-[\w+#.-]+$/;
const HIGHLIGHT_CLASS = /^hljs(-[\w-]+)?$/;

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  const classes = node.getAttribute("class");
  if (classes !== null) {
    const allowed = classes.split(/\s+/).filter((name) =>
      (node.tagName === "CODE" && LANGUAGE_CLASS.test(name)) || (node.tagName === "SPAN" && HIGHLIGHT_CLASS.test(name)));
    if (allowed.length) node.setAttribute("class", allowed.join(" "));
    else node.removeAttribute("class");
  }
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});
hljs.configure({ ignoreUnescapedHTML: true });

function highlight(code, final) {
  const name = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9);
  const language = name && hljs.getLanguage(name) ? name : null;
  if (!language && !final) return; // guessing the language waits for the whole block
  const text = code.textContent;
  const result = language ? hljs.highlight(text, { language, ignoreIllegals: true }) : hljs.highlightAuto(text);
  code.replaceChildren(DOMPurify.sanitize(result.value, PURIFY));
  code.classList.add("hljs");
  if (result.language) code.dataset.language = result.language;
}

function withCopyButton(pre) {
  const block = document.createElement("div");
  block.className = "code-block";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "secondary copy-code";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy code");
  pre.replaceWith(block);
  block.append(copy, pre);
}

// `text` as a DOM fragment; `final`: the answer is complete (languages may be guessed).
export function renderMarkdown(text, final) {
  const fragment = DOMPurify.sanitize(markdown.parse(text), PURIFY);
  for (const pre of fragment.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (code) highlight(code, final);
    pre.tabIndex = 0; // a wide block scrolls: keyboard users can reach it
    withCopyButton(pre);
  }
  return fragment;
}
