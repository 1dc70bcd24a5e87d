"""Train or evaluate a policy with SPPO: ``python train.py fit --config configs/demo.yaml``.

Every subcommand and option of LightningCLI works (``fit``, ``validate``, ``--print_config``, dotted overrides).
"""

from sppo_lightning.cli import main

if __name__ == "__main__":
    main()
