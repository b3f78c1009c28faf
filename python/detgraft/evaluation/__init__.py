"""Layer 4, evaluation: detections on a dataset, COCO metrics per class and group, confusions,
drift, predictions on image files and the HTML report."""
