// The Live tab: the microphone, straight from the browser to /v1/realtime (OpenAI's Realtime
// transcription session), audio/pcm at 24 kHz in appends of CHUNK_MS. Run by gr.HTML's
// js_on_load: `element` is the tab's HTML, `props.labels` the tag names and emoji (ui/live.py).
const CHUNK_MS = 100;
const RATE = 24000;
const labels = props.labels;
const $ = (id) => element.querySelector(`[data-live="${id}"]`);
const button = $("toggle"), state = $("state"), partial = $("partial"), finals = $("finals");
let session = null;

function setState(text, kind) {
  state.textContent = text;
  state.dataset.kind = kind || "";
}

function seconds(value) {
  return `${value.toFixed(2)}`;
}

function tagText(kind, value) {
  if (!value) return null;
  const known = labels[kind][value];
  return known ? known : value;
}

function showFinal(event, latencyMs) {
  const line = document.createElement("div");
  line.className = "sv-live-final";
  line.dataset.itemId = event.item_id;
  if (latencyMs !== null) line.dataset.latencyMs = String(Math.round(latencyMs));
  const time = document.createElement("span");
  time.className = "sv-live-time";
  time.textContent = `${seconds(event.start)}–${seconds(event.end)} s`;
  const text = document.createElement("span");
  text.className = "sv-live-text";
  text.textContent = event.transcript;  // text, never HTML
  line.append(time, text);
  for (const kind of ["language", "emotion", "event"]) {
    const label = tagText(kind, event[kind]);
    if (!label) continue;
    const badge = document.createElement("span");
    badge.className = `sv-badge sv-${kind}`;
    badge.dataset[kind] = event[kind];
    badge.textContent = label;
    line.append(badge);
  }
  finals.prepend(line);
}

function toBase64(int16) {
  const bytes = new Uint8Array(int16.buffer, int16.byteOffset, int16.byteLength);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function toInt16(value) {
  return Math.max(-32768, Math.min(32767, Math.round(value * 32767)));
}

// A windowed-sinc low-pass (Hamming, TAPS taps) at `cutoff` cycles per input sample, gain 1.
const TAPS = 31;
function lowPass(cutoff) {
  const middle = (TAPS - 1) / 2, taps = new Float32Array(TAPS);
  let sum = 0;
  for (let k = 0; k < TAPS; k++) {
    const x = k - middle;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    taps[k] = sinc * (0.54 - 0.46 * Math.cos(2 * Math.PI * k / (TAPS - 1)));
    sum += taps[k];
  }
  return taps.map((t) => t / sum);
}

// Float samples at `from` Hz to 16-bit at RATE, one block after another (only where the
// browser would not capture at RATE itself). The position between input samples carries over
// from block to block, so no time is lost at a block's end; when downsampling, a low-pass
// below RATE's Nyquist first, so what lies above it does not fold down into speech.
class Resampler {
  constructor(from) {
    this.from = from;
    this.step = from / RATE;  // input samples per output sample
    this.taps = from > RATE ? lowPass(0.45 * RATE / from) : null;
    this.history = new Float32Array(TAPS - 1);  // the filter's last inputs
    this.position = 0;  // the next output's place, in input samples from this block's start
    this.previous = 0;  // the last (filtered) input sample of the block before
  }

  filter(samples) {
    if (!this.taps) return samples;
    const input = new Float32Array(this.history.length + samples.length);
    input.set(this.history);
    input.set(samples, this.history.length);
    const out = new Float32Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
      let value = 0;
      for (let k = 0; k < TAPS; k++) value += this.taps[k] * input[i + TAPS - 1 - k];
      out[i] = value;
    }
    this.history = input.slice(input.length - this.history.length);
    return out;
  }

  push(samples) {
    if (this.from === RATE) return Int16Array.from(samples, toInt16);
    const x = this.filter(samples), out = [];
    // Outputs between the block before's last sample (index -1) and this block's last.
    let at = this.position;
    for (; at <= x.length - 1; at += this.step) {
      const j = Math.floor(at), f = at - j;
      const left = j < 0 ? this.previous : x[j];
      const right = j + 1 < x.length ? x[j + 1] : left;
      out.push(toInt16(left * (1 - f) + right * f));
    }
    this.position = at - x.length;
    if (x.length) this.previous = x[x.length - 1];
    return Int16Array.from(out);
  }
}

const WORKLET = `class Tap extends AudioWorkletProcessor {
  process(inputs) {
    if (inputs[0] && inputs[0][0]) this.port.postMessage(inputs[0][0].slice(0));
    return true;
  }
}
registerProcessor("sv-tap", Tap);`;

// The microphone in an AudioContext at RATE where the browser allows it; else (Firefox will
// not connect a microphone to a context of another rate than its own) at the browser's rate,
// resampled here.
async function connectMicrophone(media) {
  try {
    const context = new AudioContext({sampleRate: RATE});
    try {
      return [context, context.createMediaStreamSource(media)];
    } catch (e) {
      context.close();
    }
  } catch (e) {
    // no context at RATE at all
  }
  const context = new AudioContext();
  return [context, context.createMediaStreamSource(media)];
}

async function openAudio(onSamples) {
  const media = await navigator.mediaDevices.getUserMedia({audio: {
    channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
  let context, source;
  try {
    [context, source] = await connectMicrophone(media);
  } catch (e) {
    media.getTracks().forEach((t) => t.stop());
    throw e;
  }
  const url = URL.createObjectURL(new Blob([WORKLET], {type: "application/javascript"}));
  await context.audioWorklet.addModule(url);
  URL.revokeObjectURL(url);
  const tap = new AudioWorkletNode(context, "sv-tap");
  const resampler = new Resampler(context.sampleRate);
  element.dataset.captureRate = String(context.sampleRate);
  tap.port.onmessage = (message) => onSamples(resampler.push(message.data));
  source.connect(tap);
  let stopped = false;
  return () => {
    if (stopped) return;
    stopped = true;
    media.getTracks().forEach((t) => t.stop());
    context.close();
  };
}

class LiveSession {
  constructor() {
    this.pending = [];
    this.pendingCount = 0;
    this.sentMs = 0;  // audio sent so far, in stream time
    this.captured = [];  // [stream ms at the end of a chunk, when it was captured]
    this.stopAudio = null;
    this.closing = false;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.ws = new WebSocket(`${scheme}://${location.host}/v1/realtime?intent=transcription`);
    this.ws.onopen = () => this.start();
    this.ws.onmessage = (message) => this.receive(JSON.parse(message.data));
    this.ws.onclose = (close) => this.closed(close);
  }

  async start() {
    if (this.closing) {  // stopped while connecting
      this.ws.close();
      return;
    }
    const language = $("language").value;
    this.ws.send(JSON.stringify({type: "session.update", session: {type: "transcription",
      audio: {input: {format: {type: "audio/pcm", rate: RATE},
                      transcription: {language: language === "auto" ? null : language}}}}}));
    try {
      this.stopAudio = await openAudio((pcm) => this.capture(pcm));
      if (this.closing) this.stopAudio();  // stopped while the microphone opened
    } catch (e) {
      setState(`The microphone is not available: ${e.message || e}`, "error");
      this.ws.close();
      return;
    }
    setState("Listening…", "listening");
  }

  capture(pcm) {
    this.pending.push(pcm);
    this.pendingCount += this.pending[this.pending.length - 1].length;
    if (this.pendingCount < RATE * CHUNK_MS / 1000 || this.ws.readyState !== WebSocket.OPEN) {
      return;
    }
    const chunk = new Int16Array(this.pendingCount);
    let at = 0;
    for (const part of this.pending) { chunk.set(part, at); at += part.length; }
    this.pending = [];
    this.pendingCount = 0;
    this.sentMs += chunk.length * 1000 / RATE;
    this.captured.push([this.sentMs, performance.now()]);
    if (this.captured.length > 3000) this.captured.shift();
    this.ws.send(JSON.stringify({type: "input_audio_buffer.append", audio: toBase64(chunk)}));
  }

  // When the audio at stream time `ms` was captured (null: before what is remembered).
  capturedAt(ms) {
    const found = this.captured.find(([end]) => end >= ms);
    return found ? found[1] : null;
  }

  receive(event) {
    if (event.type === "input_audio_buffer.speech_started") {
      partial.textContent = "…";
      partial.dataset.itemId = event.item_id;
    } else if (event.type === "conversation.item.input_audio_transcription.delta") {
      partial.textContent = event.partial !== undefined ? event.partial
        : partial.textContent.replace(/…$/, "") + event.delta;
    } else if (event.type === "conversation.item.input_audio_transcription.completed") {
      const at = this.capturedAt(event.end * 1000);
      showFinal(event, at === null ? null : performance.now() - at);
      if (partial.dataset.itemId === event.item_id) partial.textContent = "";
    } else if (event.type === "conversation.item.input_audio_transcription.failed") {
      partial.textContent = "";
    } else if (event.type === "error") {
      setState(event.error.message, "error");
    }
  }

  stop() {
    this.closing = true;
    if (this.stopAudio) this.stopAudio();
    if (this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({type: "session.close"}));  // the open turn is finished first
      setState("Finishing…", "finishing");
    } else if (this.ws.readyState === WebSocket.CONNECTING) {
      this.ws.close();
    }
  }

  closed(close) {
    if (this.stopAudio) this.stopAudio();
    if (close.code !== 1000 && state.dataset.kind !== "error") {
      setState(`The session ended (${close.code}${close.reason ? ": " + close.reason : ""})`,
               "error");
    } else if (close.code === 1000) {
      setState("Stopped.", "stopped");
    }
    partial.textContent = "";
    button.textContent = "Start";
    session = null;
  }
}

button.addEventListener("click", () => {
  if (session === null) {
    session = new LiveSession();
    button.textContent = "Stop";
    setState("Connecting…", "connecting");
  } else if (!session.closing) {
    session.stop();
  }
});
