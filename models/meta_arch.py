"""Mask R-CNN meta-architecture for backbones that need the whole ImageList.

detectron2 0.6's :class:`GeneralizedRCNN` hands ``images.tensor`` to its backbone, which
loses the per-image sizes. MIMDet's partial observation must know which tokens are padding,
so :class:`GeneralizedRCNNImageListForward` passes the ImageList itself (detectron2's FPN
forwards its input to ``bottom_up`` unchanged). It also offers the LSJ post-processing of
the Benchmarking configs, where test images are resized with one scale and padded to a fixed
square: predictions go back to the original image with that one factor on both axes.
"""
from typing import Dict, List, Optional

import torch
from detectron2.layers.batch_norm import NaiveSyncBatchNorm
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances, ROIMasks
from detectron2.utils.events import get_event_storage

__all__ = ["GeneralizedRCNNImageListForward", "lsj_detector_postprocess", "head_norm"]



def head_norm(channels: int) -> NaiveSyncBatchNorm:
    """Norm of the box and mask head convs: SyncBN that tolerates empty inputs.

    ``stats_mode="N"`` weights each worker's statistics by its number of samples, so a
    worker with no RoIs does not distort them. A named function (not a lambda) so configs
    that use it can be saved.
    """
    return NaiveSyncBatchNorm(channels, stats_mode="N")


def lsj_detector_postprocess(
    results: Instances, output_height: int, output_width: int, mask_threshold: float = 0.5
) -> Instances:
    """Map detections on a resized-and-padded input back to the original image.

    ``results.image_size`` is the padded square the model saw. The image inside it was
    resized by one factor, so boxes are scaled by ``max(sx, sy)`` for both axes (the
    padded side would give a wrong, smaller factor), clipped, and masks pasted at the
    original resolution.

    Args:
        results: raw detector outputs on the padded input (modified in place).
        output_height, output_width: the original image size.
        mask_threshold: binarisation threshold of the pasted masks.
    """
    input_height, input_width = results.image_size
    scale = max(output_width / input_width, output_height / input_height)
    results = Instances((output_height, output_width), **results.get_fields())
    boxes = results.pred_boxes if results.has("pred_boxes") else results.proposal_boxes
    boxes.scale(scale, scale)
    boxes.clip(results.image_size)
    results = results[boxes.nonempty()]
    if results.has("pred_masks"):
        masks = results.pred_masks
        roi_masks = masks if isinstance(masks, ROIMasks) else ROIMasks(masks[:, 0, :, :])
        results.pred_masks = roi_masks.to_bitmasks(
            results.pred_boxes, output_height, output_width, mask_threshold
        ).tensor
    return results


class GeneralizedRCNNImageListForward(GeneralizedRCNN):
    """GeneralizedRCNN whose backbone receives the ImageList (padded tensor + sizes).

    Args:
        lsj_postprocess: map test predictions back with one scale factor for both axes
            (for inputs resized and padded to a fixed square, as in LSJ); otherwise use
            detectron2's per-axis ``detector_postprocess``.
        **kwargs: the arguments of :class:`GeneralizedRCNN` (backbone, proposal_generator,
            roi_heads, pixel_mean, pixel_std, input_format, vis_period).
    """

    def __init__(self, *, lsj_postprocess: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lsj_postprocess = lsj_postprocess

    def _gt_instances(self, batched_inputs: List[Dict]) -> Optional[List[Instances]]:
        if "instances" not in batched_inputs[0]:
            return None
        return [x["instances"].to(self.device) for x in batched_inputs]

    def _given_proposals(self, batched_inputs: List[Dict]) -> List[Instances]:
        if "proposals" not in batched_inputs[0]:
            raise ValueError("the model has no proposal_generator and the inputs carry no 'proposals'")
        return [x["proposals"].to(self.device) for x in batched_inputs]

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Training: dict of losses. Evaluation: per-image dicts with "instances"."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = self._gt_instances(batched_inputs)
        features = self.backbone(images)
        if self.proposal_generator is not None:
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        else:
            proposals, proposal_losses = self._given_proposals(batched_inputs), {}
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        return {**detector_losses, **proposal_losses}

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """Run inference; see :meth:`GeneralizedRCNN.inference`."""
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images)
        if detected_instances is None:
            if self.proposal_generator is not None:
                proposals, _ = self.proposal_generator(images, features, None)
            else:
                proposals = self._given_proposals(batched_inputs)
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            detected_instances = [x.to(self.device) for x in detected_instances]
            results = self.roi_heads.forward_with_given_boxes(features, detected_instances)
        if not do_postprocess:
            return results
        return self._postprocess_outputs(results, batched_inputs, images.image_sizes)

    def _postprocess_outputs(self, instances, batched_inputs, image_sizes) -> List[Dict]:
        postprocess = lsj_detector_postprocess if self.lsj_postprocess else detector_postprocess
        processed = []
        for results, inputs, image_size in zip(instances, batched_inputs, image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": postprocess(results, height, width)})
        return processed
