// AudioWorklet: gapless playback of the reply's PCM16 chunks as they arrive. Chunks queue up
// and are read sample by sample, so consecutive chunks join without a gap; the page learns how
// much was played (for conversation.item.truncate) and when playback starts and stops.
class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];          // Float32Arrays
    this.offset = 0;          // into queue[0]
    this.played = 0;          // samples played of the current reply
    this.playing = false;
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === "chunk") {
        const pcm = new Int16Array(m.pcm);
        const f = new Float32Array(pcm.length);
        for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
        this.queue.push(f);
      } else if (m.type === "clear") {          // barge-in / interrupt: drop what is queued
        this.queue = [];
        this.offset = 0;
        this.report(false);
      } else if (m.type === "reset") {          // a new reply
        this.played = 0;
        this.lastReport = undefined;
      }
    };
  }
  report(playing) {
    if (playing !== this.playing) {
      this.playing = playing;
      this.port.postMessage({ type: playing ? "started" : "stopped", played: this.played });
    }
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - i, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + n), i);
      i += n;
      this.offset += n;
      this.played += n;
      if (this.offset === head.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    out.fill(0, i);
    if (i > 0) this.report(true);
    else if (this.queue.length === 0) this.report(false);
    if (i > 0 && (this.lastReport === undefined || this.played - this.lastReport >= 1200)) {
      this.lastReport = this.played;            // every ~50 ms, not every 128 samples
      this.port.postMessage({ type: "progress", played: this.played });
    }
    return true;
  }
}
registerProcessor("player", Player);
