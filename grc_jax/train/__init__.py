"""GRC training: losses, gradients (GradCache), optimizer, train step, loop, checkpoints, eval."""
