"""The inputs of a program exported with keyword inputs (a transformers model: `input_ids`, `attention_mask`,
`labels`...), read from its example inputs, and batches cut to a program's static batch size.

A program's graph module takes exactly the keywords it was exported with. Random inputs (`--samples N`, `inspect`)
follow the example: the main input (the first keyword) is drawn like any model's input (token ids in
`[0, vocabulary)` when it feeds an embedding, whose rows give the vocabulary). Every other keyword, and any keyword
a batch of data lacks, follows its example tensor: a constant one (an attention mask of ones, token types of zeros)
stays that constant, an integer one (labels) is drawn uniformly between its example's smallest and largest value,
a floating one from N(0, 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class KeywordInputs:
    """One sample of each keyword input of a program, from its example inputs; `main` is the first keyword."""

    examples: dict[str, torch.Tensor]
    main: str
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.examples[self.main].shape[1:])

    def describe(self) -> str:
        return ", ".join(
            f"{key} {tuple(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}" for key, t in self.examples.items()
        )

    def complete(self, x: Any) -> Any:
        """The keyword batch of `x`: a tensor is the main input (random inputs, or one array of data); a dict
        gets the keywords it lacks, each following its example (as transformers fills a missing attention mask
        with ones). A dict without the main input is left as it is, for the program to name what it expects."""
        given = {self.main: x.to(self.examples[self.main].dtype)} if isinstance(x, torch.Tensor) else dict(x)
        if self.main not in given:
            return given
        main = given[self.main]
        n = int(main.shape[0])
        for key, example in self.examples.items():
            if key in given:
                continue
            shape = (n, *example.shape[1:])
            if example.numel() == 0:
                value = example.new_zeros(shape)
            elif bool((example == example.flatten()[0]).all()):
                value = example.new_full(shape, example.flatten()[0].item())
            elif example.is_floating_point():
                value = torch.randn(shape, generator=self.generator).to(example.dtype)
            else:
                low, high = int(example.min()), int(example.max())
                value = torch.randint(low, high + 1, shape, generator=self.generator).to(example.dtype)
            given[key] = value.to(main.device)
        return given


def keyword_inputs(program: Any) -> KeywordInputs | None:
    """The keyword inputs of an ExportedProgram exported with keyword tensors only (no positional ones)."""
    example = getattr(program, "example_inputs", None)
    if not example:
        return None
    args, kwargs = example
    if args or not kwargs or not all(isinstance(t, torch.Tensor) and t.ndim for t in kwargs.values()):
        return None
    return KeywordInputs({key: t.detach().cpu() for key, t in kwargs.items()}, next(iter(kwargs)))


def embedding_rows(graph_module: Any, name: str) -> int | None:
    """The rows of the embedding table the graph input `name` indexes (the vocabulary of token ids), if any."""
    placeholder = next((n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name == name), None)
    if placeholder is None:
        return None
    frontier, seen = [placeholder], set()
    while frontier:  # through the reshapes and casts a model applies to its ids first
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target is torch.ops.aten.embedding.default and user.args[1] is node:
                weight = user.args[0].meta.get("val") if hasattr(user.args[0], "meta") else None
                if isinstance(weight, torch.Tensor) and weight.ndim == 2:
                    return int(weight.shape[0])
            elif user.op == "call_function" and any(s in str(user.target) for s in ("view", "_to_copy", "reshape")):
                frontier.append(user)
    return None


def cut(x: Any, y: torch.Tensor | None, size: int) -> Iterator[tuple[Any, torch.Tensor | None, int]]:
    """(inputs, labels, valid) in batches of exactly `size` samples, the last padded by repeating its first
    sample; `x` a tensor or a dict, list or tuple of them, all with the batch first."""

    def rows(value: Any, start: int) -> Any:
        if isinstance(value, dict):
            return {key: rows(item, start) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(rows(item, start) for item in value)
        part = value[start : start + size]
        short = size - int(part.shape[0])
        return torch.cat([part, part[:1].expand(short, *part.shape[1:])]) if short > 0 else part

    first = x
    while isinstance(first, (dict, list, tuple)):
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    total = int(first.shape[0])
    for start in range(0, total, size):
        yield rows(x, start), None if y is None else rows(y, start), min(size, total - start)
