// The send page: find studies (the hub's or the PACS's), pick them, and send them with a
// report. Studies the hub holds become a transfer at once; studies in the PACS are fetched
// by the institution's gateway first, and the report follows once the transfer exists.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const $ = (id) => document.getElementById(id);
  const search = $("study-search");
  const results = $("study-results").tBodies[0];
  let matches = [];

  const dicomDate = (d) => (d || "").replace(/-/g, "");
  const shownDate = (d) => (/^\d{8}$/.test(d || "") ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : d || "");
  const name = (pn) => {
    const [family, ...given] = String(pn || "").split("^");
    return given.join(" ").trim() ? `${family}, ${given.join(" ").trim()}` : family;
  };

  // The form as DICOM query keys (PS3.4 C.2.2.2): names match from the start, dates as a range.
  function keys() {
    const f = IB.fields(search);
    const out = {};
    for (const k of ["PatientID", "AccessionNumber"]) if (f[k]) out[k] = f[k].trim();
    if (f.ModalitiesInStudy) out.ModalitiesInStudy = f.ModalitiesInStudy.trim().toUpperCase();
    if (f.PatientName) out.PatientName = f.PatientName.trim() + "*";
    if (f.nhs_number) {
      out.PatientID = f.nhs_number.replace(/[\s-]/g, "");
      out.IssuerOfPatientID = "NHS";
    }
    if (f.date_from || f.date_to) out.StudyDate = `${dicomDate(f.date_from)}-${dicomDate(f.date_to)}`;
    return out;
  }

  function cell(row, text) {
    const td = row.insertCell();
    td.textContent = text == null ? "" : String(text);
    return td;
  }

  function list(found) {
    matches = found;
    results.replaceChildren();
    if (!found.length) {
      const row = results.insertRow();
      const td = cell(row, "No study matches.");
      td.colSpan = 9;
      td.className = "empty";
      return;
    }
    found.forEach((m, i) => {
      const row = results.insertRow();
      const box = Object.assign(document.createElement("input"), { type: "checkbox", value: String(i), name: "study" });
      box.setAttribute("aria-label", `Send study of ${shownDate(m.StudyDate)} ${m.StudyDescription || ""}`);
      row.insertCell().append(box);
      cell(row, name(m.PatientName));
      cell(row, m.PatientID);
      cell(row, m._nhs_number);
      cell(row, shownDate(m.StudyDate));
      cell(row, m.StudyDescription);
      cell(row, [].concat(m.ModalitiesInStudy || []).join("/"));
      cell(row, m.AccessionNumber);
      cell(row, m.NumberOfStudyRelatedInstances);
    });
  }

  search.addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = $("search-message");
    const source = IB.fields(search).source;
    IB.say(out, source === "pacs" ? "Asking the PACS…" : "Searching…");
    try {
      const answer =
        source === "pacs"
          ? await IB.api("POST", "/api/v1/pacs/find", { level: "STUDY", keys: keys(), limit: 100 })
          : await IB.api("POST", "/portal/send/studies", { keys: keys(), limit: 100 });
      list(answer.matches || []);
      IB.say(out, `${answer.matches.length} found.`, "ok");
    } catch (error) {
      IB.say(out, error.message, "error");
    }
  });

  for (const radio of document.querySelectorAll('input[name="report"]')) {
    radio.addEventListener("change", () => {
      $("report-pdf").hidden = radio.value !== "pdf" || !radio.checked;
      $("report-text").hidden = radio.value !== "text" || !radio.checked;
    });
  }

  function report() {
    const kind = IB.fields($("send-form")).report;
    if (kind === "pdf") {
      const file = $("report-file").files[0];
      if (!file) throw new Error("choose the PDF report, or no report");
      return { body: file, type: "application/pdf" };
    }
    if (kind === "text") {
      const text = $("report-body").value;
      if (!text.trim()) throw new Error("type the report, or choose no report");
      return { body: text, type: "text/plain" };
    }
    return null;
  }

  async function attach(transferId, studyUid, doc) {
    const title = $("report-title").value || "Report";
    const query = new URLSearchParams({ title, study_instance_uid: studyUid });
    await IB.api("POST", `/api/v1/transfers/${encodeURIComponent(transferId)}/reports?${query}`, doc.body, {
      "Content-Type": doc.type,
    });
  }

  const wait = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // A fetch from the PACS: follow the gateway's task until it has made the transfer.
  async function followFetch(task, out) {
    for (;;) {
      const state = await IB.api("GET", `/api/v1/pacs/tasks/${encodeURIComponent(task.id)}`);
      if (state.status === "failed" || state.status === "expired") throw new Error(`the gateway could not fetch the studies: ${state.error || state.status}`);
      if (state.transfer_id && state.status === "done") return state.transfer_id;
      IB.say(out, `The gateway is fetching from the PACS (${state.status})…`);
      await wait(1000);
    }
  }

  $("send-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const out = $("send-message");
    const chosen = [...results.querySelectorAll('input[name="study"]:checked')].map((b) => matches[Number(b.value)]);
    const button = form.querySelector('button[type="submit"]');
    try {
      if (!chosen.length) throw new Error("choose at least one study");
      const f = IB.fields(form);
      if (!f.receiver) throw new Error("choose where to send");
      const doc = report();
      const uids = chosen.map((m) => m.StudyInstanceUID);
      const body = { receiver: f.receiver, priority: f.priority, reason: f.reason || "", study_instance_uids: uids };
      button.disabled = true;
      let transferId;
      if (chosen.every((m) => m._source === "hub")) {
        transferId = (await IB.api("POST", "/api/v1/transfers", body)).id;
      } else {
        const task = await IB.api("POST", "/api/v1/pacs/fetch", body);
        IB.say(out, "The gateway is fetching the studies from the PACS…");
        transferId = await followFetch(task, out);
      }
      if (doc) await attach(transferId, uids[0], doc);
      out.replaceChildren(
        document.createTextNode(`Sent${doc ? " with the report" : ""}. `),
        Object.assign(document.createElement("a"), { href: "/portal/outbox", textContent: "Follow it in the outbox" }),
      );
      out.className = "notice ok";
    } catch (error) {
      IB.say(out, error.message, "error");
    } finally {
      button.disabled = false;
    }
  });
});
