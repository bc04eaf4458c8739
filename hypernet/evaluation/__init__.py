"""Evaluation of merged LoRAs by a multimodal judge, as in the paper (arXiv 2412.05148); no ComfyUI import.

One module per seam, each leaning only on the ones before it:

- ``transport``: one HTTP POST with a single deadline, a size cap and a cancel check;
- ``judge``: the OpenAI-compatible chat-completions client, its API-key rules and redaction;
- ``protocol``: the questions, how an answer is read, votes, per-image results and scores;
- ``pictures``: verdicts drawn on images, a grid, the scores as a bar chart;
- ``ranking``: labelled images (one label per merge method) ranked by both %, subject %, style %;
- ``batch_files`` and ``batch``: the resumable run over folders of generated images and its result files.

Nothing is imported here: each user imports the modules it needs (the evaluation node: judge, protocol,
pictures, ranking; ``python -m hypernet evaluate``: batch as well), so the node never loads the folder runner.
"""
