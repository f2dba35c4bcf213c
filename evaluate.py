"""Score explainers on one dataset: ``python evaluate.py [explainers=[...]] [key=value ...]`` (conf/evaluate.yaml)."""

from tame_lit.evaluate import main

if __name__ == "__main__":
    main()
