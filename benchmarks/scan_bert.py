"""Cost of a scan with gradients of a BERT-sized transformers model against a plain forward+backward of the same
batches (issue 11: <= 1.25x).

    python benchmarks/scan_bert.py           # prints a markdown table (docs/benchmarks.md, "Scan (transformers BERT)")

The model: `BertForSequenceClassification` built from a config (nothing downloaded, random init): 4 layers,
hidden 256, FFN 1024, 4 heads; 128 sequences of 64 tokens in batches of 32, with class labels. The plain pass sums
the model's cross-entropy over the batch's samples and backpropagates into the parameters, as the scan does; the
scan gets the same batches as mappings ({"input_ids", "attention_mask", "labels"}).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import measure  # noqa: E402

SEQUENCES, TOKENS, BATCH, ROUNDS = 128, 64, 32, 5


def main() -> None:
    import torch
    import torch.nn.functional as F
    import transformers

    import deadneuron

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        num_labels=4,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (SEQUENCES, TOKENS), generator=generator)
    labels = torch.randint(0, config.num_labels, (SEQUENCES,), generator=generator)
    batches = [
        {
            "input_ids": ids[i : i + BATCH],
            "attention_mask": torch.ones_like(ids[i : i + BATCH]),
            "labels": labels[i : i + BATCH],
        }
        for i in range(0, SEQUENCES, BATCH)
    ]
    params = [p for p in model.parameters() if p.requires_grad]

    def plain() -> None:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
            torch.autograd.grad(loss, params)

    def scan() -> None:
        deadneuron.scan(model, batches, loss="ce")

    report = deadneuron.scan(model, batches, loss="ce")
    times = measure({"plain": plain, "scan": scan}, ROUNDS, target_s=0.5)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
        f"{SEQUENCES} sequences x {TOKENS} tokens, batch {BATCH}; {len(report.layers)} sites "
        f"({', '.join(sorted({layer.kind for layer in report.layers}))}); median of {ROUNDS} interleaved rounds\n"
    )
    print("| run | ms | ratio | target |\n| --- | --- | --- | --- |")
    print(f"| plain forward+backward (summed CE) | {times['plain']:.0f} | 1.00 | |")
    ratio = times["scan"] / times["plain"]
    print(f"| scan with gradients (CE on labels) | {times['scan']:.0f} | {ratio:.2f} | <= 1.25 |")


if __name__ == "__main__":
    main()
