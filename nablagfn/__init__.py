"""nablagfn: residual ∇-GFlowNet fine-tuning of diffusion models on differentiable rewards."""
__version__ = "0.1.0"
