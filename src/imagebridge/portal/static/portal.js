// The portal's common behaviour: JSON calls to the hub's API with the session's CSRF token,
// forms that call it, parts of pages that refresh themselves, and logging out.
"use strict";

const IB = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

  function toLogin() {
    location.assign("/portal/login?next=" + encodeURIComponent(location.pathname));
  }

  function reason(data, status) {
    const detail = data && data.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return "the hub answered " + status;
  }

  // Call the API; resolves to the answer's JSON, or throws an Error with the hub's reason.
  async function api(method, url, body, headers = {}) {
    const init = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf(), ...headers } };
    if (body !== undefined) {
      if (body instanceof Blob || typeof body === "string") init.body = body;
      else {
        init.body = JSON.stringify(body);
        init.headers["Content-Type"] = "application/json";
      }
    }
    const response = await fetch(url, init);
    if (response.status === 401 && !url.startsWith("/api/v1/auth/")) {
      toLogin();
      throw new Error("your session has ended: log in again");
    }
    const type = response.headers.get("content-type") || "";
    const data = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) throw new Error(reason(data, response.status));
    return data;
  }

  // A form's fields as JSON: lists from data-type="list" (split on commas and spaces) and
  // checked boxes of data-type="checks"; empty optional fields are left out.
  function fields(form) {
    const out = {};
    for (const el of form.elements) {
      if (!el.name || el.disabled || el.type === "file" || el.dataset.path !== undefined) continue;
      if (el.dataset.type === "checks") {
        out[el.name] = out[el.name] || [];
        if (el.checked) out[el.name].push(el.value);
      } else if (el.type === "radio") {
        if (el.checked) out[el.name] = el.value;
      } else if (el.type === "checkbox") {
        out[el.name] = el.checked;
      } else if (el.dataset.type === "list") {
        out[el.name] = el.value.split(/[\s,]+/).filter(Boolean);
      } else if (el.value !== "") {
        out[el.name] = el.type === "number" ? Number(el.value) : el.value;
      }
    }
    return out;
  }

  function path(template, form) {
    return template.replace(/\{(\w+)\}/g, (_, name) => {
      const value = form ? form.elements[name]?.value : "";
      return encodeURIComponent(value || "");
    });
  }

  function say(where, text, kind) {
    if (!where) return;
    where.textContent = text;
    where.className = "notice " + (kind || "");
  }

  function shown(data, keys) {
    return keys.split(",").map((k) => `${k}: ${typeof data[k] === "object" ? JSON.stringify(data[k]) : data[k]}`).join(" · ");
  }

  async function act(el, form) {
    const out = (form || el.closest("form") || el.parentElement).querySelector("output");
    if (el.dataset.confirm && !confirm(el.dataset.confirm)) return;
    const method = el.dataset.method || "POST";
    try {
      const data = await api(method, path(el.dataset.api, form), method === "GET" ? undefined : form ? fields(form) : {});
      say(out, el.dataset.show ? shown(data, el.dataset.show) : "Done.", "ok");
      if (el.dataset.then === "reload") setTimeout(() => location.reload(), 400);
      if (el.dataset.then === "refresh") refreshAll();
    } catch (error) {
      say(out, error.message, "error");
    }
  }

  // Parts of pages: a form whose fields are POSTed to data-fragment, answered with HTML.
  const live = [];
  async function refresh(form) {
    const target = document.getElementById(form.dataset.target);
    try {
      target.innerHTML = await api("POST", form.dataset.fragment, fields(form));
      target.removeAttribute("aria-busy");
    } catch (error) {
      say(form.querySelector("output") || target, error.message, "error");
    }
  }
  function refreshAll() {
    live.forEach(refresh);
  }

  async function sha256Into(input) {
    const file = input.files[0];
    if (!file) return;
    const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
    input.form.elements[input.dataset.sha256Into].value = [...new Uint8Array(digest)]
      .map((b) => b.toString(16).padStart(2, "0"))
      .join("");
  }

  async function exportFile(button) {
    const form = button.closest("form");
    const out = form.querySelector("output");
    try {
      const response = await fetch(button.dataset.export, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf(), "Content-Type": "application/json" },
        body: JSON.stringify(fields(form)),
      });
      if (!response.ok) throw new Error(reason(await response.json(), response.status));
      const name = /filename="([^"]+)"/.exec(response.headers.get("content-disposition") || "");
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await response.blob());
      link.download = name ? name[1] : "export.csv";
      link.click();
      URL.revokeObjectURL(link.href);
      say(out, "Exported.", "ok");
    } catch (error) {
      say(out, error.message, "error");
    }
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.dataset.api) {
      event.preventDefault();
      act(form, form);
    } else if (form.dataset.fragment) {
      event.preventDefault();
      refresh(form);
    }
  });

  document.addEventListener("click", (event) => {
    const el = event.target.closest("button[data-api], button[data-export]");
    if (!el) return;
    event.preventDefault();
    if (el.dataset.export) exportFile(el);
    else act(el, null);
  });

  document.addEventListener("change", (event) => {
    const el = event.target;
    if (el.dataset.sha256Into) sha256Into(el);
    const form = el.form;
    if (form && form.dataset.live) refresh(form);
  });

  document.addEventListener("DOMContentLoaded", () => {
    for (const form of document.querySelectorAll("form[data-live]")) {
      live.push(form);
      refresh(form);
    }
    if (live.length) {
      const every = Math.min(...live.map((f) => Number(f.dataset.live)));
      setInterval(() => document.visibilityState === "visible" && refreshAll(), every);
    }
    document.getElementById("logout")?.addEventListener("click", async () => {
      try {
        await api("POST", "/api/v1/auth/logout");
      } finally {
        location.assign("/portal/login");
      }
    });
  });

  return { api, fields, say, refreshAll, toLogin };
})();
