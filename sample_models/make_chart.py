"""Write the README's chart: the firing rates of the bundled sample CNN's units on its held-out digits.

Run from the repository root: `python sample_models/make_chart.py` (needs torch and matplotlib:
`pip install -e '.[all]'`). Writes docs/images/digits_cnn_firing.svg, the chart `deadneuron scan --html` draws.
"""

from __future__ import annotations

from pathlib import Path

import deadneuron
from deadneuron.report import charts

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "images" / "digits_cnn_firing.svg"


def main() -> None:
    model = deadneuron.load_model(HERE / "digits_cnn.pt2")
    report = deadneuron.scan(model, HERE / "digits_heldout.npz", name="digits_cnn.pt2")
    chart = charts.firing_chart(report)
    if chart is None:
        raise SystemExit("the sample's report has no per-unit statistics to draw")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(chart.standalone())
    print(f"wrote {OUT.relative_to(HERE.parent)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
