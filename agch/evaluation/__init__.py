"""What an mAP is and how it is computed: the protocol record every figure carries, Hamming ranking,
mAP@k and mAP@ALL (metrics, ranking, kernel), and the scoring of a model's codes (scoring)."""
