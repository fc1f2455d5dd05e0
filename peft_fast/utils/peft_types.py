"""PEFT's enums, with the same string values so configs on disk round-trip."""
import enum


class PeftType(str, enum.Enum):
    """Adapter methods. Only LORA and IA3 are implemented; the others exist so that a
    config naming them is recognised and refused with a clear error."""

    LORA = "LORA"
    IA3 = "IA3"
    ADALORA = "ADALORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    BOFT = "BOFT"
    VERA = "VERA"


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
