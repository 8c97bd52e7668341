"""Training data as `datasets` datasets: the synthetic Match3 task, and causal-LM blocks of any text corpus.

Match3 (Sanford, Hsu & Telgarsky 2023), causal version
------------------------------------------------------
A sequence of numbers x_1 .. x_N in [0, M). Position i is *positive* when there are positions j1, j2 <= i with

    x_i + x_j1 + x_j2 == 0 (mod M).

j1 and j2 may be any positions up to and including i: equal to each other, to i, or both (so 3 x_i == 0 alone
makes i positive). This is Sanford et al.'s "any pair" definition restricted to the causal past, and it is
exactly the pair set a tensor-attention query at i may attend to (a <= i, b <= i).

Token format (direct token ids, chosen so the package's byte tokenizer renders them readably):

    <s> x_1 a_1 x_2 a_2 ... x_N a_N

- `<s>` is the byte tokenizer's bos (`tokenization.BOS_ID`);
- number x is the byte `chr(ord("A") + x)`, i.e. token id `BYTE_OFFSET + 65 + x` (so M <= 191);
- answer a_i is the byte "+" (positive) or "-" (negative).

The model reads x_i and predicts the next token, the answer; labels are the answer ids at answer positions and
-100 everywhere else, so the loss (after transformers' usual one-token shift) is on answer tokens only. Decoding
an example with the byte tokenizer gives e.g. "<s>D-K-C+". Earlier answers stay in the context, as in any
causal LM trained with teacher forcing.

Balance. Each position first draws a wanted label (positive with probability `positive_rate`), then x_i uniformly
among the numbers that give that label. When no number gives it -- late in a sequence the pair sums of the
prefix can cover every residue, and then every number is positive -- the other label is used. So the realised
positive rate is `positive_rate` until the prefix saturates and higher after; `Match3Task.describe()` reports it.
Keep `length` around M or below for a near-balanced task (M=16, N=16: about 63% positive).

Text corpora
------------
`text_dataset` reads local files with the `datasets` builder their extension names (`.txt`: one document per file;
`.json` / `.jsonl`, `.csv`, `.parquet`: one document per record, its `text_column`); any other source
(`datasets.load_dataset(name)`, a streamed dataset) goes through `causal_lm_blocks` directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from datasets import Dataset, IterableDataset, load_dataset

from .tokenization import BOS_ID, BYTE_OFFSET, NUM_BYTES

NUMBER_BASE_ID = BYTE_OFFSET + ord("A")
POSITIVE_ID = BYTE_OFFSET + ord("+")
NEGATIVE_ID = BYTE_OFFSET + ord("-")
MAX_MODULUS = NUM_BYTES - ord("A")
IGNORE_INDEX = -100  # the label transformers' losses skip
# Held-out Match3 data comes from a seed no training seed reaches by `seed + small int`.
EVAL_SEED_OFFSET = 1_000_003
# The `datasets` builder that reads each file extension.
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def number_token_id(x: int) -> int:
    return NUMBER_BASE_ID + x


def match3_labels(numbers: Sequence[int], modulus: int) -> list[bool]:
    """Label of every position of one sequence, computed incrementally in O(N * M).

    `pair_sums[r]` says some j1, j2 among the earlier positions (j1 == j2 allowed) have x_j1 + x_j2 == r; `seen[r]`
    says some earlier position holds r. Position i is positive when -x_i is an earlier pair sum, or -2 x_i was seen
    (pairs with i itself on one side), or 3 x_i == 0 (j1 = j2 = i).
    """
    seen = np.zeros(modulus, dtype=bool)
    pair_sums = np.zeros(modulus, dtype=bool)
    labels = []
    for x in numbers:
        labels.append(bool(pair_sums[-x % modulus] or seen[-2 * x % modulus] or 3 * x % modulus == 0))
        pair_sums |= np.roll(seen, x)  # x + every earlier value
        pair_sums[2 * x % modulus] = True
        seen[x] = True
    return labels


@dataclass
class Match3Task:
    """Settings of a Match3 dataset; `build()` returns the `datasets.Dataset`.

    Args:
        modulus: M, numbers lie in [0, M); 1 <= M <= 191.
        length: N, numbers per sequence (the token sequence is 1 + 2N long).
        num_examples: sequences in the dataset.
        seed: seed of the generator; the same settings and seed give the same dataset.
        positive_rate: probability that a position is drawn as positive (see the module notes on saturation).
    """

    modulus: int = 16
    length: int = 16
    num_examples: int = 10000
    seed: int = 0
    positive_rate: float = 0.5

    def __post_init__(self):
        checks = {
            "modulus": (self.modulus, lambda v: 1 <= v <= MAX_MODULUS, f"an int in [1, {MAX_MODULUS}]"),
            "length": (self.length, lambda v: v >= 1, "an int >= 1"),
            "num_examples": (self.num_examples, lambda v: v >= 1, "an int >= 1"),
            "seed": (self.seed, lambda v: v >= 0, "an int >= 0"),
        }
        for name, (value, ok, allowed) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
                raise ValueError(f"Match3 `{name}` must be {allowed}, got {value!r}")
        rate = self.positive_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"Match3 `positive_rate` must be a float in [0, 1], got {rate!r}")

    def sample_numbers(self, rng: np.random.Generator) -> tuple[list[int], list[bool]]:
        """One sequence and its labels, drawn to hit `positive_rate` per position while the prefix allows it."""
        modulus = self.modulus
        values = np.arange(modulus)
        seen = np.zeros(modulus, dtype=bool)
        pair_sums = np.zeros(modulus, dtype=bool)
        numbers, labels = [], []
        for _ in range(self.length):
            positive = pair_sums[-values % modulus] | seen[-2 * values % modulus] | (3 * values % modulus == 0)  # [M]
            want_positive = rng.random() < self.positive_rate
            candidates = np.flatnonzero(positive == want_positive)
            if candidates.size == 0:
                candidates = values
            x = int(rng.choice(candidates))
            numbers.append(x)
            labels.append(bool(positive[x]))
            pair_sums |= np.roll(seen, x)
            pair_sums[2 * x % modulus] = True
            seen[x] = True
        return numbers, labels

    def encode(self, numbers: Sequence[int], labels: Sequence[bool]) -> dict[str, list[int]]:
        input_ids = [BOS_ID]
        targets = [IGNORE_INDEX]
        for x, positive in zip(numbers, labels):
            answer = POSITIVE_ID if positive else NEGATIVE_ID
            input_ids += [number_token_id(x), answer]
            targets += [IGNORE_INDEX, answer]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": targets}

    def build(self) -> Dataset:
        """Columns: input_ids, attention_mask, labels (model inputs); numbers, answers (0/1) for inspection."""
        rng = np.random.default_rng(self.seed)
        rows = {"input_ids": [], "attention_mask": [], "labels": [], "numbers": [], "answers": []}
        for _ in range(self.num_examples):
            numbers, labels = self.sample_numbers(rng)
            for key, value in self.encode(numbers, labels).items():
                rows[key].append(value)
            rows["numbers"].append(numbers)
            rows["answers"].append([int(positive) for positive in labels])
        return Dataset.from_dict(rows)

    def describe(self, dataset: Dataset) -> dict[str, float]:
        """Realised positive rate, and the accuracy of the best guess from the position alone."""
        answers = np.asarray(dataset["answers"], dtype=float)  # [num_examples, length]
        per_position = answers.mean(0)
        return {
            "positive_rate": float(answers.mean()),
            "position_only_accuracy": float(np.maximum(per_position, 1 - per_position).mean()),
        }


def match3_splits(
    modulus: int, length: int, positive_rate: float, num_train_examples: int, num_eval_examples: int, seed: int
) -> tuple[Dataset, Dataset]:
    """Training and held-out Match3 datasets; the held-out one is drawn from `seed + EVAL_SEED_OFFSET`."""
    train = Match3Task(modulus, length, num_train_examples, seed, positive_rate)
    held_out = Match3Task(modulus, length, num_eval_examples, seed + EVAL_SEED_OFFSET, positive_rate)
    return train.build(), held_out.build()


def answer_accuracy(predictions, labels) -> float:
    """Share of answer tokens (labels != -100) predicted exactly, from logits [B, T, V] or argmax ids [B, T]
    (numpy arrays or CPU tensors) as the model's forward returns them: position t predicts token t + 1."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == 3:
        predictions = predictions.argmax(-1)
    predictions, labels = predictions[:, :-1], labels[:, 1:]
    scored = labels != IGNORE_INDEX
    return float((predictions[scored] == labels[scored]).mean()) if scored.any() else float("nan")


def check_text_files(
    files: str | os.PathLike | Sequence[str | os.PathLike], argument: str = "files"
) -> tuple[list[str], str]:
    """The paths of local text files and the `datasets` builder that reads them (`BUILDERS`, by extension), after
    checking that they exist, are not empty and share one format; `argument` names the files in errors."""
    paths = [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"`{argument}`: files do not exist: {missing}")
    empty = [path for path in paths if os.path.getsize(path) == 0]
    if empty:
        raise ValueError(f"`{argument}`: files are empty: {empty}")
    builders = {path: BUILDERS.get(Path(path).suffix.lower()) for path in paths}
    unknown = [path for path, builder in builders.items() if builder is None]
    if unknown:
        raise ValueError(f"`{argument}`: no format known for the extension of {unknown}; allowed: {sorted(BUILDERS)}")
    if len(set(builders.values())) > 1:
        raise ValueError(f"`{argument}` mixes formats {builders}; give files of one format")
    return paths, builders[paths[0]]


def read_text_files(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    streaming: bool = False,
    num_proc: int | None = None,
    argument: str = "files",
) -> Dataset | IterableDataset:
    """Local files of one format as raw records (see `check_text_files`). A `.txt` file is one record (datasets'
    `sample_by="document"`): its line breaks stay in the text, and it gets one eos."""
    paths, builder = check_text_files(files, argument)
    options = {"sample_by": "document"} if builder == "text" else {}
    if not streaming:
        options["num_proc"] = num_proc
    return load_dataset(builder, data_files=paths, split="train", streaming=streaming, **options)


def causal_lm_blocks(
    records: Dataset | IterableDataset,
    tokenizer,
    block_size: int = 128,
    text_column: str = "text",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Records of text as blocks of `block_size` tokens (input_ids, attention_mask, labels), as run_clm makes them.

    Each record's `text_column` is tokenized without special tokens and followed by the tokenizer's eos (when it has
    one); the records of one map batch (1,000) are concatenated and cut into blocks, and the tail of each batch that
    does not fill a block is dropped. Memory holds one batch at a time, whatever the size of the corpus; a streamed
    `IterableDataset` stays streamed. Labels equal input_ids (the model shifts them). `tokenizer` is the package's
    byte tokenizer or any other, e.g. `AutoTokenizer.from_pretrained(name)`.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"`block_size` must be an int >= 2, got {block_size!r}")
    # A streamed csv or text source does not know its columns before it is read.
    columns = records.column_names or list(next(iter(records)))
    if text_column not in columns:
        raise ValueError(f"`text_column` {text_column!r} is not a column of the data; columns: {columns}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize_and_group(batch):
        encoded = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        stream = [token for ids in encoded for token in ids + eos]
        starts = range(0, len(stream) - block_size + 1, block_size)
        blocks = [stream[start : start + block_size] for start in starts]
        labels = [list(block) for block in blocks]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": labels}

    options = {} if isinstance(records, IterableDataset) else {"num_proc": num_proc}
    return records.map(tokenize_and_group, batched=True, remove_columns=columns, **options)


def text_dataset(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    block_size: int = 128,
    text_column: str = "text",
    streaming: bool = False,
    num_proc: int | None = None,
    argument: str = "files",
) -> Dataset | IterableDataset:
    """Local text, json / jsonl, csv or parquet files as causal-LM blocks: `read_text_files`, then `causal_lm_blocks`."""
    records = read_text_files(files, streaming=streaming, num_proc=num_proc, argument=argument)
    return causal_lm_blocks(records, tokenizer, block_size=block_size, text_column=text_column, num_proc=num_proc)
