"""nn.Modules, configs and timm integration for fused adapters (see the adapters issue)."""
