"""Why a module is not scored: the reasons the math gives, which the report records as they are."""

ZERO_V = "base and aligned identical"
ZERO_DELTA = "LoRA delta is zero"
UNCHANGED = "weight unchanged by the fine-tune"
