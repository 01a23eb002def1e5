// The voice page: the OpenAI Realtime protocol over /v1/realtime, the microphone through an
// AudioWorklet at 24 kHz, the reply through another (gapless), barge-in and interrupt.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { ws: null, ctx: null, mic: null, player: null, mode: "ptt", talking: false,
                reply: null, sentAt: 0, playing: false };
window.voice = state;                       // for people poking at it (and the browser test)

function log(msg) { $("log").textContent = msg; }
function status(msg) { $("status").textContent = msg; }
function b64(buf) {
  let s = ""; const u = new Uint8Array(buf);
  for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
  return btoa(s);
}
function unb64(s) { const b = atob(s); const u = new Uint8Array(b.length); for (let i = 0; i < b.length; i++) u[i] = b.charCodeAt(i); return u.buffer; }
function send(ev) { if (state.ws && state.ws.readyState === 1) state.ws.send(JSON.stringify(ev)); }
function instructions() { const v = $("voice").value; return v === "custom" ? $("prompt").value : v; }
function turnDetection() {
  return state.mode === "vad" ? { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500,
                                  create_response: true, interrupt_response: true } : null;
}

function addTurn(who, text) {
  const div = document.createElement("div"); div.className = "turn";
  div.innerHTML = `<div class="who"></div><div class="text"></div>`;
  div.querySelector(".who").textContent = who; div.querySelector(".text").textContent = text;
  $("turns").appendChild(div); return div;
}

async function startAudio() {
  // one context at the protocol's rate: the browser resamples the microphone to it
  state.ctx = new AudioContext({ sampleRate: 24000 });
  await state.ctx.audioWorklet.addModule("/web/player.js");
  await state.ctx.audioWorklet.addModule("/web/recorder.js");
  state.player = new AudioWorkletNode(state.ctx, "player", { outputChannelCount: [1] });
  state.player.connect(state.ctx.destination);
  state.player.port.onmessage = (e) => {
    const m = e.data, r = state.reply;
    if (r) r.playedSamples = m.played;
    if (m.type === "started") {
      state.playing = true; $("status").dataset.playing = "true"; status("playing");
      if (r && !r.firstPlayAt) r.firstPlayAt = performance.now();
    } else if (m.type === "stopped") {
      state.playing = false; $("status").dataset.playing = "false";
      if (r && r.done) status(r.cancelled ? "interrupted" : "ready");
    }
  };
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  const src = state.ctx.createMediaStreamSource(stream);
  state.mic = new AudioWorkletNode(state.ctx, "recorder");
  state.mic.port.onmessage = (e) => {
    if (state.mode === "vad" || state.talking) send({ type: "input_audio_buffer.append", audio: b64(e.data) });
  };
  src.connect(state.mic);
  await state.ctx.resume();
}

function stopPlayback(cancelled) {
  state.player.port.postMessage({ type: "clear" });
  const r = state.reply;
  if (!r) return;
  if (cancelled && !r.done) send({ type: "response.cancel" });
  // history keeps what was heard: the server deletes the rest
  if (r.itemId && !r.truncated) {
    r.truncated = true;
    send({ type: "conversation.item.truncate", item_id: r.itemId, content_index: 0,
           audio_end_ms: Math.floor((r.playedSamples || 0) / 24) });
  }
}

function onEvent(ev) {
  const r = state.reply;
  switch (ev.type) {
    case "session.created":
      $("session").textContent = ev.session.id;
      if (!params.get("session_id") && instructions()) send({ type: "session.update", session: { type: "realtime", instructions: instructions() } });
      send({ type: "session.update", session: { type: "realtime", audio: { input: { turn_detection: turnDetection() } } } });
      status("ready"); break;
    case "input_audio_buffer.speech_started":
      if (state.playing || (r && !r.done)) { stopPlayback(false); status("interrupted (you spoke)"); }
      else status("listening…");
      break;
    case "input_audio_buffer.speech_stopped": state.sentAt = performance.now(); status("thinking…"); break;
    case "conversation.item.added":
      if (ev.item.role === "user" && ev.item.content[0].type === "input_audio") addTurn("you", "(spoken)");
      break;
    case "response.created":
      state.reply = { id: ev.response.id, el: addTurn("model", ""), text: "", startedAt: state.sentAt || performance.now() };
      state.player.port.postMessage({ type: "reset" });
      status("thinking…"); break;
    case "response.output_item.added": if (r) r.itemId = ev.item.id; break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (r) { r.text += ev.delta; r.el.querySelector(".text").textContent = r.text; }
      break;
    case "response.output_audio.delta":
      if (!r || r.truncated) break;
      if (!r.firstAudioAt) {
        r.firstAudioAt = performance.now();
        const span = document.createElement("span"); span.className = "ttfa";
        span.textContent = `first audio ${Math.round(r.firstAudioAt - r.startedAt)} ms`;
        r.el.querySelector(".who").appendChild(span);
      }
      state.player.port.postMessage({ type: "chunk", pcm: unb64(ev.delta) });
      break;
    case "response.done":
      if (r) {
        r.done = true; r.cancelled = ev.response.status === "cancelled";
        if (r.cancelled && !r.truncated) stopPlayback(false);
        if (!state.playing) status(r.cancelled ? "interrupted" : "ready");
      }
      break;
    case "error": log(`${ev.error.code}: ${ev.error.message}`); break;
  }
}

async function connect() {
  const key = $("key").value.trim();
  if (key) localStorage.setItem("baichuan-audio-key", key);
  try { await startAudio(); } catch (e) { log(`audio: ${e}`); return; }
  const q = params.get("session_id") ? `?session_id=${encodeURIComponent(params.get("session_id"))}` : "";
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime${q}`;
  state.ws = new WebSocket(url, ["realtime", `openai-insecure-api-key.${key}`]);
  state.ws.onmessage = (m) => onEvent(JSON.parse(m.data));
  state.ws.onclose = (e) => { status(`closed (${e.code}${e.reason ? ": " + e.reason : ""})`); setConnected(false); };
  setConnected(true);
}

function setConnected(on) {
  for (const id of ["talk", "interrupt", "typed", "disconnect"]) $(id).disabled = !on;
  $("connect").disabled = on;
}

function setMode(mode) {
  state.mode = mode;
  $("talk").disabled = mode === "vad" || !state.ws;
  send({ type: "session.update", session: { type: "realtime", audio: { input: { turn_detection: turnDetection() } } } });
}

function talk(on) {
  if (state.mode !== "ptt" || !state.ws) return;
  if (on && !state.talking) {
    if (state.playing || (state.reply && !state.reply.done)) stopPlayback(true);   // barge-in by button
    send({ type: "input_audio_buffer.clear" });
    state.talking = true; $("talk").classList.add("held"); status("listening…");
  } else if (!on && state.talking) {
    state.talking = false; $("talk").classList.remove("held");
    state.sentAt = performance.now();
    send({ type: "input_audio_buffer.commit" });
    send({ type: "response.create" });
  }
}

$("key").value = localStorage.getItem("baichuan-audio-key") || "";   // never from the URL: logs and history keep URLs
$("voice").onchange = () => { $("prompt").hidden = $("voice").value !== "custom"; };
$("connect").onclick = connect;
$("disconnect").onclick = () => state.ws && state.ws.close(1000, "bye");
$("interrupt").onclick = () => { stopPlayback(true); status("interrupted"); };
for (const el of document.querySelectorAll("input[name=mode]")) el.onchange = () => setMode(el.value);
$("talk").onpointerdown = () => talk(true);
$("talk").onpointerup = () => talk(false);
$("talk").onpointerleave = () => talk(false);
$("typed").onkeydown = (e) => {
  if (e.key !== "Enter" || !$("typed").value.trim()) return;
  if (state.playing || (state.reply && !state.reply.done)) stopPlayback(true);
  const text = $("typed").value; $("typed").value = "";
  addTurn("you", text);
  state.sentAt = performance.now();
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  send({ type: "response.create" });
};
