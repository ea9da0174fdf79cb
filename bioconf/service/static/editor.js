// The config editor: a form rendered from the service's JSON Schema (groups from x-groups/x-group,
// basic/advanced from x-level, descriptions as help), validated through POST v1/validate as the
// user edits. A plain ES module: no build step, nothing fetched from anywhere but this service.

const DEBOUNCE_MS = 250;
const $ = (id) => document.getElementById(id);

const fields = new Map(); // name -> {name, kind, nullable, row, control, error}
let extra = {}; // keys of an opened file that the schema does not know: sent as they are, to be reported
let canonical = null; // the last valid config, canonicalized by the service
let timer = 0;
let sequence = 0;
let inflight = null;

// What kind of control a property needs: a choice (enum or boolean), plain text, or JSON text.
function describe(prop) {
  const options = prop.anyOf ?? [prop];
  const types = new Set(options.map((option) => option.type));
  const nullable = types.delete("null");
  const choice = options.find((option) => option.enum || "const" in option);
  if (choice) return { kind: "choice", nullable, choices: choice.enum ?? [choice.const] };
  if (types.size === 1 && types.has("boolean")) return { kind: "choice", nullable, choices: [true, false] };
  if (types.size === 1 && types.has("string")) return { kind: "text", nullable };
  return { kind: "json", nullable };
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function control(name, prop, spec) {
  const id = `field-${name}`;
  const fallback = prop.default ?? null;
  const shown = spec.kind === "text" && typeof fallback === "string" ? fallback : JSON.stringify(fallback);
  if (spec.kind === "choice") {
    const select = element("select", { id, name });
    select.append(element("option", { value: "" }, `default (${shown})`));
    const choices = spec.nullable ? [...spec.choices, null] : spec.choices;
    for (const choice of choices) select.append(element("option", { value: JSON.stringify(choice) }, String(choice)));
    return select;
  }
  return element("input", { id, name, type: "text", placeholder: shown, spellcheck: "false", autocomplete: "off" });
}

// The value a control holds; undefined when it is left to its default. JSON text that does not parse is
// sent as a string, as `bioconf validate --set` reads VALUE, so the service names the type error.
function valueOf(entry) {
  const text = entry.control.value;
  if (text === "") return undefined;
  if (entry.kind === "choice") return JSON.parse(text);
  if (entry.kind === "text") return entry.nullable && text.trim() === "null" ? null : text;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function setValue(entry, value) {
  let text = "";
  if (value !== undefined) text = entry.kind === "text" && typeof value === "string" ? value : JSON.stringify(value);
  if (entry.kind === "choice" && text && ![...entry.control.options].some((option) => option.value === text)) {
    entry.control.append(element("option", { value: text }, String(value))); // an alias such as "bf16"
  }
  entry.control.value = text;
  entry.row.classList.toggle("set", text !== "");
}

function render(schema) {
  const form = $("form");
  const groups = new Map();
  for (const group of schema["x-groups"] ?? []) {
    const body = element("div", { class: "fields" });
    const fieldset = element("fieldset", { id: `group-${group.name}` }, element("legend", {}, group.title), body);
    groups.set(group.name, body);
    form.append(fieldset);
  }
  for (const [name, prop] of Object.entries(schema.properties)) {
    const spec = describe(prop);
    const input = control(name, prop, spec);
    const help = element("p", { class: "help", id: `help-${name}` }, prop.description ?? "");
    const error = element("p", { class: "error", id: `error-${name}` });
    input.setAttribute("aria-describedby", `error-${name} help-${name}`);
    const level = prop["x-level"] === "basic" ? "basic" : "advanced";
    const row = element(
      "div",
      { class: `field ${level}`, "data-field": name },
      element("label", { for: input.id, title: prop.title ?? name }, name),
      input,
      error,
      help,
    );
    fields.set(name, { name, ...spec, row, control: input, error });
    const group = groups.get(prop["x-group"]) ?? groups.get("other");
    (group ?? form).append(row);
  }
  form.addEventListener("input", (event) => {
    const entry = fields.get(event.target.name);
    if (entry) entry.row.classList.toggle("set", entry.control.value !== "");
    schedule();
  });
}

function currentDocument() {
  const document = { ...extra };
  for (const entry of fields.values()) {
    const value = valueOf(entry);
    if (value !== undefined) document[entry.name] = value;
  }
  return document;
}

function schedule(delay = DEBOUNCE_MS) {
  $("download").disabled = true; // never download a config older than what the form shows
  clearTimeout(timer);
  timer = setTimeout(validate, delay);
}

async function validate() {
  const mine = ++sequence;
  inflight?.abort();
  inflight = new AbortController();
  $("status").textContent = "validating…";
  let response;
  let result;
  try {
    response = await fetch("v1/validate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(currentDocument()),
      signal: inflight.signal,
    });
    result = await response.json();
  } catch (error) {
    if (error.name !== "AbortError" && mine === sequence) $("status").textContent = `the service did not answer: ${error.message}`;
    return;
  }
  if (mine === sequence) show(response.ok, result);
}

function clearErrors() {
  for (const entry of fields.values()) {
    entry.error.textContent = "";
    entry.row.classList.remove("invalid");
    entry.control.removeAttribute("aria-invalid");
  }
  $("messages").replaceChildren();
}

function message(text, kind, action) {
  const item = element("li", { class: kind }, text);
  if (action) item.append(" ", action);
  $("messages").append(item);
}

// The fields an error belongs beside: its own, and for a megatron rule every field the rule involves.
function fieldsOf(error) {
  const names = [];
  const own = error.loc.length ? String(error.loc[0]) : "";
  if (fields.has(own)) names.push(own);
  if (error.type === "megatron_rule" && error.input && typeof error.input === "object" && !Array.isArray(error.input)) {
    for (const name of Object.keys(error.input)) if (fields.has(name) && !names.includes(name)) names.push(name);
  }
  return names;
}

function describeError(error) {
  const where = error.loc.length > 1 ? `${error.field}: ` : "";
  const got = error.input === null || error.type === "megatron_rule" ? "" : ` (got ${JSON.stringify(error.input)})`;
  return `${where}${error.message}${got}`;
}

function show(ok, result) {
  clearErrors();
  if (ok) {
    canonical = result.config;
    $("download").disabled = false;
    $("status").textContent = `valid · sha256:${result.fingerprint.slice(0, 16)}`;
    $("status").dataset.fingerprint = result.fingerprint;
    for (const warning of result.warnings) message(warning, "warning");
    return;
  }
  canonical = null;
  delete $("status").dataset.fingerprint;
  const errors = result.errors ?? [];
  $("status").textContent = errors.length ? `${errors.length} error${errors.length > 1 ? "s" : ""}` : result.detail;
  for (const error of errors) {
    const names = fieldsOf(error);
    const text = describeError(error);
    for (const name of names) {
      const entry = fields.get(name);
      entry.error.textContent = entry.error.textContent ? `${entry.error.textContent}\n${text}` : text;
      entry.row.classList.add("invalid");
      entry.control.setAttribute("aria-invalid", "true");
    }
    if (names.length) continue;
    const key = error.loc.length ? String(error.loc[0]) : "";
    if (key in extra) {
      const remove = element("button", { type: "button" }, "remove");
      remove.addEventListener("click", () => {
        delete extra[key];
        schedule(0);
      });
      message(text, "error", remove);
    } else {
      message(text, "error");
    }
  }
}

// Canonical JSON, as `bioconf` writes it: sorted keys, two-space indent.
function sortedKeys(value) {
  if (Array.isArray(value)) return value.map(sortedKeys);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((key) => [key, sortedKeys(value[key])]));
  }
  return value;
}

function download() {
  if (!canonical) return;
  const blob = new Blob([`${JSON.stringify(sortedKeys(canonical), null, 2)}\n`], { type: "application/json" });
  const link = element("a", { href: URL.createObjectURL(blob), download: "model-config.json" });
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 0);
}

async function open(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  let data;
  try {
    data = JSON.parse(await file.text());
  } catch (error) {
    message(`${file.name}: not JSON: ${error.message}`, "error");
    return;
  }
  if (!data || typeof data !== "object" || Array.isArray(data)) {
    message(`${file.name}: a config must be a JSON object`, "error");
    return;
  }
  extra = {};
  for (const entry of fields.values()) setValue(entry, data[entry.name]);
  for (const [key, value] of Object.entries(data)) if (!fields.has(key)) extra[key] = value;
  schedule(0);
}

async function main() {
  $("advanced").addEventListener("change", (event) => $("form").classList.toggle("advanced", event.target.checked));
  $("download").addEventListener("click", download);
  $("open").addEventListener("change", open);
  let schema;
  try {
    const response = await fetch("v1/schema");
    schema = await response.json();
  } catch (error) {
    $("status").textContent = `cannot load the schema: ${error.message}`;
    return;
  }
  render(schema);
  document.body.dataset.ready = "true";
  schedule(0);
}

main();
