"""How fast a client may send audio to the realtime WebSocket (ui/realtime.py enforces it; the
stream CLI refuses a --speed beyond it). Kept here, free of the web stack, so the CLI can read it
without importing FastAPI."""

MAX_AUDIO_SPEED = 20.0  # audio seconds per second, sustained
AUDIO_BURST_S = 30.0  # audio sent at once beyond that pace
