"""The built-in CPU demo: a 2-digit addition task and a tiny character-level Llama."""
