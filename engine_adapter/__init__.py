"""The only package that imports vLLM: engine lifecycle, prompt construction, output mapping."""
