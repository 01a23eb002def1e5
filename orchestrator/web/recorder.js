// AudioWorklet: the microphone's samples (the context runs at 24 kHz) to the page in ~100 ms
// pieces of PCM16, for input_audio_buffer.append.
class Recorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.piece = new Int16Array(2400);
    this.n = 0;
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) {
      for (let i = 0; i < ch.length; i++) {
        const s = Math.max(-1, Math.min(1, ch[i]));
        this.piece[this.n++] = s < 0 ? s * 32768 : s * 32767;
        if (this.n === this.piece.length) {
          this.port.postMessage(this.piece.buffer, [this.piece.buffer]);
          this.piece = new Int16Array(2400);
          this.n = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("recorder", Recorder);
