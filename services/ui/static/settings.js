// A conversation's settings form: system prompt and sampling, with the model's defaults shown.
// Settings a new conversation starts with: the model's defaults, then the sampling the user last
// chose (kept in localStorage), with the model's own system prompt.

const LAST_USED_KEY = "petals-chat-settings";
const FALLBACK = { sampling: true, temperature: 0.75, top_p: 0.9, max_new_tokens: 256 };
const NUMBERS = ["temperature", "top_p", "max_new_tokens"];

export function modelDefaults(model) {
  const d = model?.defaults;
  const sampling = d ? { sampling: d.do_sample, temperature: d.temperature, top_p: d.top_p, max_new_tokens: d.max_new_tokens }
    : { ...FALLBACK };
  return { ...sampling, system_prompt: model?.chat.system_prompt ?? "" };
}

function lastUsed() {
  try {
    const { system_prompt: _, ...saved } = JSON.parse(localStorage.getItem(LAST_USED_KEY) || "{}");
    return saved;
  } catch {
    return {};
  }
}

export function newSettings(model) {
  return { ...modelDefaults(model), ...lastUsed() };
}

export class SettingsForm {
  constructor(form, defaultsLine, onChange) {
    this.form = form;
    this.defaultsLine = defaultsLine;
    this.model = null;
    form.addEventListener("change", () => {
      const settings = this.read();
      const { system_prompt: _, ...sampling } = settings;
      localStorage.setItem(LAST_USED_KEY, JSON.stringify(sampling));
      onChange(settings);
    });
  }

  show(settings, model) {
    this.model = model;
    const values = { ...modelDefaults(model), ...settings };
    this.form.sampling.checked = values.sampling;
    this.form.system_prompt.value = values.system_prompt;
    for (const name of NUMBERS) this.form[name].value = values[name];
    const d = modelDefaults(model);
    this.defaultsLine.textContent = `${model ? model.id : "The model"}'s defaults: sampling ${d.sampling ? "on" : "off"}, `
      + `temperature ${d.temperature}, top-p ${d.top_p}, max new tokens ${d.max_new_tokens}, `
      + `system prompt ${d.system_prompt ? `“${d.system_prompt}”` : "none"}.`;
  }

  // The form's values; a number out of its field's range falls back to the model's default.
  read() {
    const defaults = modelDefaults(this.model);
    const number = (name) => {
      const input = this.form[name];
      const value = Number(input.value);
      const ok = input.value !== "" && Number.isFinite(value) && value >= Number(input.min) && value <= Number(input.max);
      return ok ? value : defaults[name];
    };
    return {
      system_prompt: this.form.system_prompt.value,
      sampling: this.form.sampling.checked,
      temperature: number("temperature"),
      top_p: number("top_p"),
      max_new_tokens: Math.round(number("max_new_tokens")),
    };
  }
}
