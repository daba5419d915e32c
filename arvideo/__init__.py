"""arvideo: streaming, memory-bounded autoregressive long-video generation."""

__version__ = "0.1.0"
