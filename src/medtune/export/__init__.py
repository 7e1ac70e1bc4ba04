"""Deployable artefacts from a run or a model folder (`medtune export ...`).

- `gguf`: llama.cpp GGUF files (llama.cpp's converter, fetched by `converter`, and its quantizer);
- `ollama`: a Modelfile whose TEMPLATE is derived from the chat template (`chat`);
- `cards`: model card and dataset card; `hub`: push to the Hugging Face Hub;
- `adapters`: a run's LoRA adapter alone, or fused into its base; `runs`: what a path names.
"""
