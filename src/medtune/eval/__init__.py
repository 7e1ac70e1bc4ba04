"""Evaluation and benchmarks: does the model answer right, in the right format, fast enough?

- `local`: `evaluate_model(model_path, task, examples)`, in-process through the serving engine
  (what `medtune run` scores base, SFT and DPO with).
- `runner`: `medtune eval`, the task's production requests against any OpenAI-compatible endpoint
  (or a model folder), resumable.
- `bench`: `medtune bench`, latency / TTFT / throughput sweep over concurrency levels, peak memory.
- `metrics`: task scorers with bootstrap intervals; BLEU, ROUGE-L, terminology for free-text Q&A.
- `report`, `plots`: report.md, report.html (plots inlined), results.json, pass/fail targets.
- `compare`: `medtune compare RUN_A RUN_B`.
"""
