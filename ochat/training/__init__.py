"""The trainer: the sampler and the packs it makes, collation, the loss, the step, the run folder and the
entry point (`deepspeed --module ochat.training.train`)."""
