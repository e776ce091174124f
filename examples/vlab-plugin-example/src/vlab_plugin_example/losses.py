"""A loss plugin: log-cosh Dice (smoother than Dice near 0 and 1)."""

from pydantic import BaseModel, ConfigDict, Field

from vesuvius_lab.core.registry import plugin


class LogCoshDiceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in the experiment file is an error
    smooth: float = Field(1.0, ge=0, description="Added to numerator and denominator.")


@plugin(LogCoshDiceParams)
def log_cosh_dice(params: LogCoshDiceParams, **context):
    """log(cosh(Dice loss)), masked by the ignore label."""
    import torch  # heavy imports inside the factory keep `vlab plugins` fast

    def loss(logits, target, valid):
        prob = torch.sigmoid(logits.float()) if logits.shape[1] == 1 else torch.softmax(logits.float(), 1)[:, 1:2]
        prob, target = prob * valid, target.float() * valid
        intersection = (prob * target).sum()
        dice = (2 * intersection + params.smooth) / (prob.sum() + target.sum() + params.smooth)
        return torch.log(torch.cosh(1 - dice))

    return loss
