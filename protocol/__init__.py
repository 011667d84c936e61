"""OpenAI wire format shared by router, worker and loadgen: request/response models and the error body."""
