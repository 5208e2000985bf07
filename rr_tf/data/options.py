"""Names of the data layer's choices, importable without TensorFlow, so a
config can validate them before anything heavy is loaded."""

# how fine-tuning patches pick their centre (rr_tf.data.recipes.finetune_patch)
PATCH_SAMPLING = ("class_balanced", "foreground")
