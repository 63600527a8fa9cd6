"""The Iris data: reading and checking ``data/iris.csv`` and the stratified, seeded train/eval split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError

FEATURE_NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
TARGET_NAME = "species"
CSV_HEADER = [*FEATURE_NAMES, TARGET_NAME]
# The notebook's label vocabulary; its order fixes the class ids (setosa=0, virginica=1, versicolor=2).
LABEL_VOCABULARY = ["setosa", "virginica", "versicolor"]


def read_iris_csv(path: str | Path, label_vocabulary: list[str] = LABEL_VOCABULARY) -> pd.DataFrame:
    """Read and validate an Iris CSV; errors name the file and the row (1-based, header = row 1)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a readable CSV file ({str(error).splitlines()[0]})") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty") from None
    if list(frame.columns) != CSV_HEADER:
        raise UserError(f"{path}: header must be {','.join(CSV_HEADER)}, found {','.join(map(str, frame.columns))}")
    if frame.empty:
        raise UserError(f"{path}: no data rows")
    for name in FEATURE_NAMES:
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = values.isna() | ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: row {row + 2}: {name}={frame[name].iloc[row]!r} is not a number")
        frame[name] = values.astype(np.float32)
    unknown = ~frame[TARGET_NAME].isin(label_vocabulary)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        value = frame[TARGET_NAME].iloc[row]
        raise UserError(f"{path}: row {row + 2}: species={value!r} is not one of {', '.join(label_vocabulary)}")
    return frame


def stratified_split(frame: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split each class separately with one seeded permutation, so both parts keep the class mix."""
    if not 0 < eval_fraction < 1:
        raise UserError(f"prepare.eval_fraction must be between 0 and 1, got {eval_fraction}")
    rng = np.random.default_rng(seed)
    train_parts, eval_parts = [], []
    for species in sorted(frame[TARGET_NAME].unique()):
        rows = frame[frame[TARGET_NAME] == species]
        order = rng.permutation(len(rows))
        eval_count = max(1, round(len(rows) * eval_fraction))
        eval_parts.append(rows.iloc[order[:eval_count]])
        train_parts.append(rows.iloc[order[eval_count:]])
    train = pd.concat(train_parts).sort_index().reset_index(drop=True)
    evaluation = pd.concat(eval_parts).sort_index().reset_index(drop=True)
    return train, evaluation


def features_and_labels(
    frame: pd.DataFrame, label_vocabulary: list[str] = LABEL_VOCABULARY
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    features = {name: frame[name].to_numpy(np.float32) for name in FEATURE_NAMES}
    labels = frame[TARGET_NAME].map({label: i for i, label in enumerate(label_vocabulary)}).to_numpy(np.int64)
    return features, labels


def sample_around(frame: pd.DataFrame, rows: int, seed: int) -> dict[str, np.ndarray]:
    """``rows`` feature rows drawn around the data's distribution: pick a row, add Gaussian noise
    with a tenth of each feature's spread, so the batch covers the classes and their borders."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(frame), size=rows)
    result = {}
    for name in FEATURE_NAMES:
        values = frame[name].to_numpy(np.float32)
        noise = rng.normal(0.0, 0.1 * float(values.std()), size=rows)
        result[name] = (values[picks] + noise).astype(np.float32)
    return result
