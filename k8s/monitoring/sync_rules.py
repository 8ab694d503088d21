"""Write prometheusrule.yaml (prometheus-operator) from rules.yaml (plain Prometheus rules), or check it.

    python k8s/monitoring/sync_rules.py          # rewrite prometheusrule.yaml
    python k8s/monitoring/sync_rules.py --check  # exit 1 if it differs from rules.yaml

rules.yaml is the source: promtool checks and unit-tests it; the PrometheusRule carries the same
groups so the operator loads exactly what was tested.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yaml"
TARGET = HERE / "prometheusrule.yaml"
HEADER = """\
# GENERATED from rules.yaml by `python k8s/monitoring/sync_rules.py`: edit rules.yaml instead.
# The operator's Prometheus must select it (kube-prometheus-stack: label release=<release name>,
# or ruleSelector: {} on the Prometheus object).
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, so the generated file stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_text: str) -> str:
    """The PrometheusRule manifest for the groups in `rules_text`."""
    groups = yaml.safe_load(rules_text)["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "rlhf-online",
                     "labels": {"app.kubernetes.io/name": "rlhf-online", "role": "alert-rules"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def main(argv: list[str]) -> int:
    want = render(RULES.read_text())
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != want:
            print(f"{TARGET} is out of date: run python {Path(__file__).relative_to(HERE.parents[1])}")
            return 1
        return 0
    TARGET.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
