"""Train an explanation head: ``python train.py [group=option ...] [key=value ...]`` (see conf/train.yaml)."""

from tame_lit.train import main

if __name__ == "__main__":
    main()
