"""Components: `apr datagen` in parts over a ParallelFor of CPU pods, and the plan before them,
which draws the problems once for every part."""

from typing import List

from kfp import dsl

from apr.cluster.defaults import APR_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def datagen_plan(preset: str, overrides: list, parts: int,
                 problems: dsl.Output[dsl.Dataset]) -> List[str]:
    """The problems, drawn once, and the parts of the dataset ("0/N" .. "N-1/N") that
    `parts` pods write, for a ParallelFor."""
    import shutil

    from apr.config import InputError, load
    from apr.stages import datagen as stage

    if parts < 1:
        raise InputError(f"datagen_pods={parts}: give 1 or more (the pods writing the traces)")
    config = load(stage.DatagenConfig, preset, stage.SECTION, [str(o) for o in overrides])
    shutil.rmtree(problems.path, ignore_errors=True)  # KFP may create the path; draw wants it new
    stage.draw(config, problems.path, progress=False)
    return [f"{i}/{parts}" for i in range(parts)]


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def datagen(preset: str, overrides: list, data: dsl.Output[dsl.Dataset], part: str = "",
            problems: dsl.Input[dsl.Dataset] = None):
    """The problems (or the plan's `problems`), their SoS+ and APR traces and the tokenizer,
    written to the `data` artifact; with `part` "I/N", part I of N of them, which
    `datagen_merge` joins."""
    import shutil

    from apr.config import load
    from apr.stages import datagen as stage

    config = load(stage.DatagenConfig, preset, stage.SECTION, [str(o) for o in overrides])
    shutil.rmtree(data.path, ignore_errors=True)  # KFP may create the path; datagen wants it new
    stage.run(config, data.path, progress=False, part=stage.Part.parse(part) if part else None,
              problems=problems.path if problems is not None else None)
