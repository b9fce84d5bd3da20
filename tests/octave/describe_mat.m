1;  % a script file: the functions below, then the commands at the end
% Reads a model, a checkpoint and an imdb written by pydagnn with Octave's own `load`,
% checks the struct layout that dagnn.DagNN.loadobj reads (it errors on a mismatch) and
% writes what it read as JSON for the Python side to compare with pydagnn's values.
% Usage: octave-cli describe_mat.m MODEL CKPT IMDB OUT.json

function check(cond, msg)
  if ~cond, error('layout: %s', msg); end
end

function d = describe_array(v)
  d = struct('class', class(v), 'size', size(v), 'sum', sum(double(v(:))), ...
             'first', double(v(1)), 'last', double(v(end)));
end

function out = describe_net(s, where)
  for f = {'layers', 'params', 'vars', 'meta'}
    check(isfield(s, f{1}), sprintf('%s has no field %s', where, f{1}));
  end
  check(isstruct(s.layers) && isrow(s.layers), [where '.layers is not a 1xN struct array']);
  want = {'name', 'type', 'inputs', 'outputs', 'params', 'block'};
  check(all(ismember(want, fieldnames(s.layers))), [where '.layers lacks a loadobj field']);
  layers = {};
  for l = 1:numel(s.layers)
    L = s.layers(l);
    w = sprintf('%s.layers(%d)', where, l);
    check(ischar(L.name) && ischar(L.type), [w ': name/type not char']);
    check(iscellstr(L.inputs) && iscellstr(L.outputs), [w ': inputs/outputs not cellstr']);
    check(iscell(L.params) && (isempty(L.params) || iscellstr(L.params)), [w ': params not a cell']);
    check(isstruct(L.block) && numel(L.block) == 1, [w ': block not a 1x1 struct']);
    b = struct();
    for f = fieldnames(L.block)'
      v = L.block.(f{1});
      if ischar(v), b.(f{1}) = v;
      elseif isnumeric(v) || islogical(v), b.(f{1}) = double(v(:))';
      elseif iscell(v), b.(f{1}) = sprintf('cell %dx%d', size(v, 1), size(v, 2));
      else, b.(f{1}) = class(v); end
    end
    layers{end + 1} = struct('name', L.name, 'type', L.type, 'inputs', {L.inputs}, ...
                             'outputs', {L.outputs}, 'params', {L.params}, 'block', b);
  end
  check(isstruct(s.params) && all(ismember({'name', 'value', 'learningRate', 'weightDecay'}, ...
        fieldnames(s.params))), [where '.params lacks name/value/learningRate/weightDecay']);
  params = {};
  for p = 1:numel(s.params)
    P = s.params(p);
    params{end + 1} = struct('name', P.name, 'value', describe_array(P.value), ...
                             'learningRate', double(P.learningRate), 'weightDecay', double(P.weightDecay));
  end
  check(isstruct(s.vars) && isfield(s.vars, 'name'), [where '.vars has no names']);
  vars = {};
  for v = 1:numel(s.vars)
    vars{end + 1} = struct('name', s.vars(v).name, 'precious', logical(s.vars(v).precious));
  end
  m = s.meta;
  check(isstruct(m), [where '.meta is not a struct']);
  meta = struct('imageSize', double(m.normalization.imageSize(:))', ...
                'averageImage', double(m.normalization.averageImage(:))', ...
                'classes', {m.classes.description});
  check(iscellstr(m.classes.description), [where '.meta.classes.description not cellstr']);
  out = struct('layers', {layers}, 'params', {params}, 'vars', {vars}, 'meta', meta);
end

args = argv();
model = load(args{1});
out.model = describe_net(model, 'model');
ck = load(args{2});
check(all(ismember({'net', 'state', 'stats'}, fieldnames(ck))), 'checkpoint lacks net/state/stats');
out.checkpoint = describe_net(ck.net, 'checkpoint.net');
check(iscell(ck.state.momentum) && numel(ck.state.momentum) == numel(ck.net.params), ...
      'state.momentum is not a cell per param');
out.momentum = cellfun(@(m) sum(double(m(:))), ck.state.momentum);
check(isstruct(ck.stats.train) && isstruct(ck.stats.val), 'stats.train/val not struct arrays');
out.stats_train_objective = [ck.stats.train.objective];
out.stats_val_objective = [ck.stats.val.objective];
db = load(args{3});
check(isfield(db, 'images') && isfield(db, 'meta'), 'imdb lacks images/meta');
out.imdb = struct('data', describe_array(db.images.data), 'labels', double(db.images.labels), ...
                  'set', double(db.images.set), 'sets', {db.meta.sets}, ...
                  'classes', {db.meta.classes.description}, 'rgbMean', double(db.meta.rgbMean(:))');
fid = fopen(args{4}, 'w');
fputs(fid, jsonencode(out));
fclose(fid);
