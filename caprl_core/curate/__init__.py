"""QA curation: from your own images to CapRL training data (issue 26).

    python -m caprl_core.curate generate --model DIR --images DIR_OR_JSONL --out FILE   # MCQs written by a VLM
    python -m caprl_core.curate filter --model DIR --in FILE --out FILE                 # the visual-dependency filter

Modules, one concern each: `prompts` (the VQA prompt the filter scores and its option letters), `extract` (parsing
the generator's markdown), `generate` (questions written through the engine), `filter` (answering with and without
the image, from the option letters' logits), `store` (resumable progress and the atomic outputs). docs/curate.md has
the formats and the measured figures.
"""
