from .config import JDLoraConfig
from .layer import JDLoraLayer, Linear
from .model import JDLoraModel
from .slots import BASE_ADAPTER_NAME, SlotTable


__all__ = ["BASE_ADAPTER_NAME", "JDLoraConfig", "JDLoraLayer", "JDLoraModel", "Linear", "SlotTable"]
