"""medtune: from a medical dataset to a served, measured, fine-tuned language model.

Prepare data (`medtune.data`), generate clinical task data (`medtune.tasks`), train
(`medtune.train`), export (`medtune.export`), serve (`medtune.serve`) and evaluate (`medtune.eval`).
The command line is `medtune` (see `medtune --help`).
"""

__version__ = "0.1.0"
