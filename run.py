"""RESCue's one entry point: `python run.py` (CPU demo) or `python run.py experiment=<name>`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from rescue.app import main as app_main

    return app_main(cfg)


if __name__ == "__main__":
    main()
