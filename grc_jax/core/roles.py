"""Token roles of a packed row (DESIGN.md section 1) and the kinds of example slots."""

import enum


class Role(enum.IntEnum):
    PAD = 0  # padding: belongs to no example (segment id 0)
    TEXT = 1  # context, no loss
    GEN = 2  # generation target: next-token loss
    LATENT = 3  # meta latent token: its input comes from the latent table, not the vocabulary


PAD, TEXT, GEN, LATENT = Role.PAD, Role.TEXT, Role.GEN, Role.LATENT


class SlotKind(enum.IntEnum):
    """What an example slot of a packed batch holds, for the contrastive loss (`Batch.seg_kind`)."""

    EMPTY = 0
    QUERY = 1
    DOC = 2


QUERY, DOC = SlotKind.QUERY, SlotKind.DOC
