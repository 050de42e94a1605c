"""The pipeline's stages, one module each; the ones with a config are named here."""

# stage -> (module, config class); each module's SECTION names its section of a preset
CONFIGS = {"datagen": ("apr.stages.datagen", "DatagenConfig"),
           "sft": ("apr.stages.sft", "SFTConfig"),
           "grpo": ("apr.stages.grpo", "GRPOConfig"),
           "evaluate": ("apr.stages.evaluate", "EvalConfig")}
