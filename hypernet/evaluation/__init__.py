"""Evaluation of merged LoRAs by a multimodal judge, as in the paper (arXiv 2412.05148); no ComfyUI import.

One module per seam, each leaning only on the ones before it:

- ``transport``: one HTTP POST with a single deadline, a size cap and a cancel check;
- ``judge``: the OpenAI-compatible chat-completions client, its API-key rules and redaction;
- ``protocol``: the questions, how an answer is read, votes, per-image results and scores;
- ``pictures``: verdicts drawn on images, a grid, the scores as a bar chart;
- ``ranking``: labelled images (one label per merge method) ranked by both %, subject %, style %;
- ``batch_files`` and ``batch``: the resumable run over folders of generated images and its result files.

The names below are what the evaluation node and ``python -m hypernet evaluate`` use.
"""

from .batch import BatchResult, PairJob, evaluate_folders, find_pairs
from .batch_files import load_style_names
from .judge import (DEFAULT_API_KEY_ENV, MAX_RETRIES, MAX_TIMEOUT_S, PINNED_URL_ENV, ChatCompletionsJudge, Judge,
                    JudgeCancelled, JudgeError)
from .pictures import annotate, grid, summary_chart
from .ranking import format_ranking, parse_labels, rank, ranking_rows
from .protocol import (ImageResult, Score, Vote, format_table, judge_image, mean_cosine, mean_over_pairs,
                       question_count, resize_long_side, score)

__all__ = [
    "BatchResult", "ChatCompletionsJudge", "DEFAULT_API_KEY_ENV", "ImageResult", "Judge", "JudgeCancelled",
    "JudgeError", "MAX_RETRIES", "MAX_TIMEOUT_S", "PINNED_URL_ENV", "PairJob", "Score", "Vote", "annotate",
    "evaluate_folders", "find_pairs", "format_ranking", "format_table", "grid", "judge_image", "load_style_names", "mean_cosine",
    "mean_over_pairs", "parse_labels", "question_count", "rank", "ranking_rows", "resize_long_side", "score",
    "summary_chart",
]
