"""Batch LongPO rows: long sequences for the policy, short sequences (one per turn) for the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad


def _pad(rows: list[list[int]], value: int, multiple: int | None) -> torch.Tensor:
    return pad(
        [torch.tensor(r, dtype=torch.long) for r in rows],
        padding_value=value,
        padding_side="right",
        pad_to_multiple_of=multiple,
    )


@dataclass
class DataCollatorForLongPO(DataCollatorMixin):
    """
    Collates tokenized LongPO rows (see `trl_longpo.tokenization.tokenize_row`).

    Policy inputs follow DPOTrainer's layout: `input_ids` stacks the B chosen sequences, then the B rejected ones,
    right-padded; `completion_mask` marks answer tokens (only the assistant answers of a multi-turn row).

    Reference inputs (omitted once reference log-probs are precomputed): `ref_input_ids` holds one short sequence
    (short prompt i + answer i) per turn and per answer, and `ref_row_index` maps each to its row in the policy
    layout (chosen row b → b, rejected row b → B + b), so a row's reference log-prob is the sum over its turns.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch_size = len(examples)
        sequences = [ex["prompt_ids"] + ex["chosen_ids"] for ex in examples]
        sequences += [ex["prompt_ids"] + ex["rejected_ids"] for ex in examples]
        completion = [[0] * len(ex["prompt_ids"]) + list(ex["chosen_mask"]) for ex in examples]
        completion += [[0] * len(ex["prompt_ids"]) + list(ex["rejected_mask"]) for ex in examples]
        output = {
            "input_ids": _pad(sequences, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(s) for s in sequences], 0, self.pad_to_multiple_of),
            "completion_mask": _pad(completion, 0, self.pad_to_multiple_of),
            # shared by row b and row B + b (share_prompt packs them as one tree)
            "prompt_length": torch.tensor([len(ex["prompt_ids"]) for ex in examples]),
        }
        if "ref_chosen_logps" in examples[0]:
            output["ref_chosen_logps"] = torch.tensor([ex["ref_chosen_logps"] for ex in examples])
            output["ref_rejected_logps"] = torch.tensor([ex["ref_rejected_logps"] for ex in examples])
            return output

        ref_sequences, ref_completion, ref_row_index, ref_prompt_length = [], [], [], []
        for side, offset in (("short_chosen_ids", 0), ("short_rejected_ids", batch_size)):
            for row, ex in enumerate(examples):
                for prompt_ids, answer_ids in zip(ex["short_prompt_ids"], ex[side], strict=True):
                    ref_sequences.append(list(prompt_ids) + list(answer_ids))
                    ref_completion.append([0] * len(prompt_ids) + [1] * len(answer_ids))
                    ref_row_index.append(row + offset)
                    ref_prompt_length.append(len(prompt_ids))
        output["ref_input_ids"] = _pad(ref_sequences, self.pad_token_id, self.pad_to_multiple_of)
        output["ref_attention_mask"] = _pad([[1] * len(s) for s in ref_sequences], 0, self.pad_to_multiple_of)
        output["ref_completion_mask"] = _pad(ref_completion, 0, self.pad_to_multiple_of)
        output["ref_row_index"] = torch.tensor(ref_row_index, dtype=torch.long)
        # sequence k (a chosen answer on its turn's short prompt) shares that prompt with sequence k + n/2 (rejected)
        output["ref_prompt_length"] = torch.tensor(ref_prompt_length, dtype=torch.long)
        return output
