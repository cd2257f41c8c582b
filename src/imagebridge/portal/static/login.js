// The login steps, through the hub's JSON API: password, then a code or enrolment.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const $ = (id) => document.getElementById(id);
  const message = $("login-message");
  const steps = ["password-step", "code-step", "enrol-step", "recovery-step"];
  let csrf = "";

  function show(step) {
    for (const id of steps) $(id).hidden = id !== step;
    const first = $(step).querySelector("input, button");
    if (first) first.focus();
  }

  function next() {
    const target = new URLSearchParams(location.search).get("next") || "/portal/";
    // Only our own pages: never an address elsewhere.
    location.assign(target.startsWith("/portal/") ? target : "/portal/");
  }

  async function call(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : "please check what you typed";
      throw new Error(detail);
    }
    if (data.csrf_token) csrf = data.csrf_token;
    return data;
  }

  async function step(form, work) {
    const button = form.querySelector("button");
    button.disabled = true;
    message.textContent = "";
    message.className = "notice";
    try {
      await work();
    } catch (error) {
      message.textContent = error.message;
      message.className = "notice error";
    } finally {
      button.disabled = false;
    }
  }

  async function enrol() {
    const data = await call("/api/v1/auth/totp/enrol");
    // Shown as an image, never as markup: an SVG image needs its namespace.
    const svg = data.qr_svg.includes("xmlns=") ? data.qr_svg : data.qr_svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ');
    $("qr").src = "data:image/svg+xml;base64," + btoa(svg);
    $("secret").textContent = data.secret;
    show("enrol-step");
  }

  $("password-step").addEventListener("submit", (event) => {
    event.preventDefault();
    step(event.target, async () => {
      const data = await call("/api/v1/auth/login", {
        username: $("username").value,
        password: $("password").value,
      });
      $("password").value = "";
      if (data.second_factor === "code") show("code-step");
      else if (data.second_factor === "enrol") await enrol();
      else next();
    });
  });

  $("code-step").addEventListener("submit", (event) => {
    event.preventDefault();
    step(event.target, async () => {
      await call("/api/v1/auth/totp", { code: $("code").value.replace(/\s/g, "") });
      next();
    });
  });

  $("enrol-step").addEventListener("submit", (event) => {
    event.preventDefault();
    step(event.target, async () => {
      const data = await call("/api/v1/auth/totp/confirm", { code: $("first-code").value.replace(/\s/g, "") });
      const list = $("recovery-codes");
      list.replaceChildren(...data.recovery_codes.map((c) => Object.assign(document.createElement("li"), { textContent: c })));
      show("recovery-step");
    });
  });

  $("recovery-done").addEventListener("click", next);

  // A session still owing its second factor comes back here: carry on where it stopped.
  fetch("/api/v1/auth/session", { credentials: "same-origin" }).then(async (response) => {
    if (!response.ok) return;
    const data = await response.json();
    csrf = data.csrf_token;
    if (!data.second_factor_pending) next();
    else if (data.totp_enabled) show("code-step");
    else enrol().catch(() => {});
  });
});
