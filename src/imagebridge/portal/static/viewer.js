// The study viewer: series thumbnails, slices by wheel, keys or slider, window/level by drag
// or preset, zoom and pan, every frame of multi-frame images. Pixels come rendered from the
// hub's own DICOMweb (WADO-RS .../frames/N/rendered with the window asked for), so every
// transfer syntax the hub decodes can be shown.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("viewer");
  if (!root) return;
  const canvas = document.getElementById("image");
  const overlay = document.getElementById("overlay");
  const seriesList = document.getElementById("series-list");
  const ctx = canvas.getContext("2d");
  const study = root.dataset.study;
  const base = `/dicomweb/studies/${encodeURIComponent(study)}`;
  const PRESETS = { lung: [-600, 1500], soft: [40, 400], bone: [480, 2500], brain: [40, 80] };
  const PRESET_KEYS = { 1: "lung", 2: "soft", 3: "bone", 4: "brain" };

  const state = {
    series: [], // {uid, number, description, modality, count}
    current: -1,
    slices: [], // {instance, frame, window: [c, w] | null}
    index: 0,
    window: null, // [center, width] chosen by the person; null: the image's own
    zoom: 1,
    pan: [0, 0],
    mode: "window",
    bitmap: null,
    shown: null, // the window the bitmap on screen was rendered with
    drawn: 0,
  };
  const cache = new Map();

  const tag = (item, t) => (item[t] && item[t].Value ? item[t].Value[0] : undefined);
  const json = async (url) => {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/dicom+json" } });
    if (response.status === 401) IB.toLogin();
    if (!response.ok) throw new Error(`the hub answered ${response.status}`);
    return response.json();
  };
  const say = (text) => {
    overlay.textContent = text;
  };

  function frameUrl(slice, window, viewport) {
    const s = state.series[state.current];
    const params = new URLSearchParams();
    if (window) params.set("window", `${Math.round(window[0])},${Math.max(1, Math.round(window[1]))},linear`);
    if (viewport) params.set("viewport", viewport);
    const q = params.toString();
    return `${base}/series/${encodeURIComponent(s.uid)}/instances/${encodeURIComponent(slice.instance)}/frames/${slice.frame}/rendered${q ? "?" + q : ""}`;
  }

  async function bitmap(url) {
    if (cache.has(url)) return cache.get(url);
    const promise = fetch(url, { credentials: "same-origin", headers: { Accept: "image/jpeg" } }).then(async (response) => {
      if (!response.ok) throw new Error(`image not available (${response.status})`);
      return createImageBitmap(await response.blob());
    });
    cache.set(url, promise);
    promise.catch(() => cache.delete(url));
    if (cache.size > 400) cache.delete(cache.keys().next().value);
    return promise;
  }

  function effectiveWindow(slice) {
    return state.window || slice.window;
  }

  function fitCanvas() {
    const box = canvas.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(box.width * ratio));
    const h = Math.max(1, Math.round(box.height * ratio));
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
    }
  }

  function paint() {
    fitCanvas();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const image = state.bitmap;
    if (!image) return;
    const fit = Math.min(canvas.width / image.width, canvas.height / image.height);
    const scale = fit * state.zoom;
    const x = (canvas.width - image.width * scale) / 2 + state.pan[0];
    const y = (canvas.height - image.height * scale) / 2 + state.pan[1];
    ctx.imageSmoothingEnabled = scale < 4;
    ctx.drawImage(image, x, y, image.width * scale, image.height * scale);
    state.drawn += 1;
    canvas.dataset.drawn = String(state.drawn);
    describe();
  }

  function describe() {
    const s = state.series[state.current];
    const slice = state.slices[state.index];
    if (!s || !slice) return;
    const w = state.shown;
    canvas.dataset.window = w ? `${Math.round(w[0])},${Math.round(w[1])}` : "";
    canvas.dataset.slice = String(state.index + 1);
    say(
      `Series ${s.number || state.current + 1} ${s.description || ""} · image ${state.index + 1} of ${state.slices.length}` +
        (slice.frame > 1 || slice.frames > 1 ? ` (frame ${slice.frame})` : "") +
        (w ? ` · W ${Math.round(w[1])} L ${Math.round(w[0])}` : "") +
        ` · zoom ${Math.round(state.zoom * 100)}%`,
    );
    const slider = document.getElementById("slice");
    if (slider) {
      slider.max = String(state.slices.length);
      slider.value = String(state.index + 1);
    }
  }

  let wanted = 0;
  async function show() {
    const slice = state.slices[state.index];
    if (!slice) return;
    const ticket = ++wanted;
    const w = effectiveWindow(slice);
    try {
      const image = await bitmap(frameUrl(slice, w));
      if (ticket !== wanted) return; // a newer slice or window was asked for meanwhile
      state.bitmap = image;
      state.shown = w;
      paint();
      if (!drag) prefetch(); // a drag's passing windows are not worth neighbours
    } catch (error) {
      say(error.message);
    }
  }

  function prefetch() {
    for (const step of [1, -1, 2, 3]) {
      const slice = state.slices[state.index + step];
      if (slice) bitmap(frameUrl(slice, effectiveWindow(slice))).catch(() => {});
    }
  }

  function go(index) {
    const next = Math.max(0, Math.min(state.slices.length - 1, index));
    if (next !== state.index || !state.bitmap) {
      state.index = next;
      show();
    }
  }

  function setWindow(center, width) {
    state.window = [center, Math.max(1, width)];
    show();
  }

  // A drag moves the window faster than the hub renders: one frame is asked for at a time,
  // and when it is drawn the window reached meanwhile is asked for next. Asked for at each
  // move, the frames queue up behind the browser's few connections and the image lags.
  let dragging = null; // the frame being fetched for a drag
  let dragMoved = false; // the window moved again while it was
  function dragWindow(center, width) {
    state.window = [center, Math.max(1, width)];
    if (dragging) {
      dragMoved = true;
      return;
    }
    dragging = show().finally(() => {
      dragging = null;
      const again = dragMoved && state.window; // a preset may have reset it meanwhile
      dragMoved = false;
      if (again) dragWindow(...state.window);
    });
  }

  function numbers(value) {
    if (value === undefined) return null;
    const v = Array.isArray(value) ? value[0] : value;
    const n = Number(v);
    return Number.isFinite(n) ? n : null;
  }

  async function openSeries(i) {
    if (i < 0 || i >= state.series.length) return;
    state.current = i;
    for (const [j, li] of [...seriesList.children].entries()) li.querySelector("button").setAttribute("aria-current", j === i ? "true" : "false");
    say("Loading the series…");
    const s = state.series[i];
    const metadata = await json(`${base}/series/${encodeURIComponent(s.uid)}/metadata`);
    const images = metadata
      .filter((m) => tag(m, "00280010")) // Rows: instances with pixels
      .map((m) => ({
        instance: tag(m, "00080018"),
        number: Number(tag(m, "00200013") || 0),
        frames: Number(tag(m, "00280008") || 1),
        center: numbers(m["00281050"] && m["00281050"].Value),
        width: numbers(m["00281051"] && m["00281051"].Value),
      }))
      .sort((a, b) => a.number - b.number);
    state.slices = images.flatMap((m) =>
      Array.from({ length: m.frames }, (_, f) => ({
        instance: m.instance,
        frame: f + 1,
        frames: m.frames,
        window: m.center !== null && m.width !== null ? [m.center, m.width] : null,
      })),
    );
    state.index = -1;
    state.bitmap = null;
    if (!state.slices.length) {
      say("This series has no images to show.");
      return;
    }
    go(Math.floor((state.slices.length - 1) / 2));
  }

  async function thumbnail(s, img) {
    try {
      const found = await json(`${base}/series/${encodeURIComponent(s.uid)}/instances`);
      found.sort((a, b) => Number(tag(a, "00200013") || 0) - Number(tag(b, "00200013") || 0));
      const middle = found[Math.floor((found.length - 1) / 2)];
      if (!middle) return;
      const url = `${base}/series/${encodeURIComponent(s.uid)}/instances/${encodeURIComponent(tag(middle, "00080018"))}/rendered?viewport=96,96`;
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "image/jpeg" } });
      if (response.ok) img.src = URL.createObjectURL(await response.blob());
    } catch (error) {
      img.alt = "no preview";
    }
  }

  async function start() {
    const found = await json(`${base}/series`);
    state.series = found
      .map((s) => ({
        uid: tag(s, "0020000E"),
        number: tag(s, "00200011"),
        description: tag(s, "0008103E") || "",
        modality: tag(s, "00080060") || "",
        count: tag(s, "00201209") || 0,
      }))
      .sort((a, b) => Number(a.number || 0) - Number(b.number || 0));
    seriesList.replaceChildren();
    state.series.forEach((s, i) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      const img = document.createElement("img");
      img.alt = "";
      img.width = 96;
      img.height = 96;
      const label = document.createElement("span");
      label.textContent = `${s.modality} ${s.number || ""} ${s.description} (${s.count})`;
      button.append(img, label);
      button.addEventListener("click", () => openSeries(i));
      li.append(button);
      seriesList.append(li);
      thumbnail(s, img);
    });
    if (!state.series.length) say("The hub holds no images of this study.");
    else await openSeries(0);
  }

  // -- the person's hands ------------------------------------------------------------------

  canvas.addEventListener(
    "wheel",
    (event) => {
      event.preventDefault();
      if (event.ctrlKey) zoom(event.deltaY < 0 ? 1.25 : 0.8);
      else go(state.index + Math.sign(event.deltaY));
    },
    { passive: false },
  );

  function zoom(factor) {
    state.zoom = Math.max(0.25, Math.min(16, state.zoom * factor));
    paint();
  }

  let drag = null;
  canvas.addEventListener("pointerdown", (event) => {
    canvas.focus();
    canvas.setPointerCapture(event.pointerId);
    const slice = state.slices[state.index];
    const w = slice ? effectiveWindow(slice) || [128, 256] : [128, 256];
    const mode = event.button === 1 || event.shiftKey ? "pan" : state.mode;
    drag = { x: event.clientX, y: event.clientY, mode, window: w, pan: [...state.pan] };
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (drag.mode === "pan") {
      const ratio = window.devicePixelRatio || 1;
      state.pan = [drag.pan[0] + dx * ratio, drag.pan[1] + dy * ratio];
      paint();
    } else {
      // Right widens the window, down raises the level: as most PACS viewers do.
      const scale = Math.max(1, drag.window[1] / 256);
      dragWindow(drag.window[0] + dy * scale, drag.window[1] + dx * scale * 2);
    }
  });
  const endDrag = () => {
    const ended = drag;
    drag = null;
    // Neighbours at the window the drag left, unless its last frame is still on its way
    // (that one fetches them once drawn).
    if (ended && ended.mode !== "pan" && !dragging) prefetch();
  };
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);

  canvas.addEventListener("keydown", (event) => {
    const keys = {
      ArrowUp: () => go(state.index - 1),
      ArrowDown: () => go(state.index + 1),
      PageUp: () => go(state.index - 10),
      PageDown: () => go(state.index + 10),
      Home: () => go(0),
      End: () => go(state.slices.length - 1),
      ArrowLeft: () => openSeries(state.current - 1),
      ArrowRight: () => openSeries(state.current + 1),
      "+": () => zoom(1.25),
      "=": () => zoom(1.25),
      "-": () => zoom(0.8),
      0: () => fit(),
      w: () => mode("window"),
      p: () => mode("pan"),
    };
    const action = keys[event.key] || (PRESET_KEYS[event.key] && (() => preset(PRESET_KEYS[event.key])));
    if (action) {
      event.preventDefault();
      action();
    }
  });

  function fit() {
    state.zoom = 1;
    state.pan = [0, 0];
    paint();
  }

  function mode(name) {
    state.mode = name;
    for (const b of root.querySelectorAll("[data-mode]")) b.setAttribute("aria-pressed", String(b.dataset.mode === name));
  }

  function preset(name) {
    if (name === "default") {
      state.window = null;
      show();
    } else setWindow(...PRESETS[name]);
  }

  root.addEventListener("click", (event) => {
    const b = event.target.closest("button");
    if (!b) return;
    if (b.dataset.preset) preset(b.dataset.preset);
    if (b.dataset.mode) mode(b.dataset.mode);
    if (b.dataset.zoom === "in") zoom(1.25);
    if (b.dataset.zoom === "out") zoom(0.8);
    if (b.dataset.zoom === "fit") fit();
  });

  const slider = document.getElementById("slice");
  slider?.addEventListener("input", () => go(Number(slider.value) - 1));
  new ResizeObserver(() => paint()).observe(canvas);

  start().catch((error) => say(`The study could not be loaded: ${error.message}`));
});
