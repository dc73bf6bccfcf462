"""Reads an offline task's documents for the harness (its YAML's `custom_dataset`): the JSONL beside it."""

from __future__ import annotations

import json
import pathlib

import datasets

HERE = pathlib.Path(__file__).parent


def _documents(name: str) -> dict[str, datasets.Dataset]:
  lines = (HERE / f'{name}.jsonl').read_text(encoding='utf-8').splitlines()
  return {'test': datasets.Dataset.from_list([json.loads(line) for line in lines])}


def next_line(**unused) -> dict[str, datasets.Dataset]:
  return _documents('shakespeare_next_line')


def last_word(**unused) -> dict[str, datasets.Dataset]:
  return _documents('shakespeare_last_word')


def speaker(**unused) -> dict[str, datasets.Dataset]:
  return _documents('shakespeare_speaker')


def scenes(**unused) -> dict[str, datasets.Dataset]:
  return _documents('shakespeare_scenes')
